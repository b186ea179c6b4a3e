"""The demo Space's idle check as a flow, run by the `loraship-space-idle` deployment's schedule
(deployments/prefect.yaml, hourly): after space.idle_hours without a request it pauses the Space or moves
it to space.idle_downgrade_to (space.idle_action), so costly hardware does not run for nobody.

    python -m flows.space_idle --config deployment_config.yaml [--dry-run]

The decision (tasks/publish/space_costs.py) reads the Space's runtime and run log only; it never calls the
app, which would wake it. A Space that is not RUNNING, already on the downgrade target, or free
(cpu-basic, which sleeps on its own) is left alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from flows.env import prepare_environment

prepare_environment()

from prefect import flow  # noqa: E402

from flows.config import load_config  # noqa: E402
from tasks.publish.hub_io import hub_api, whoami  # noqa: E402
from tasks.publish.space_costs import check_idle  # noqa: E402


def space_id_for(config: Any, api: Any, token: str) -> str:
    """The Space the space stage deploys to: space.space_id, else <hub.organization or token user>/<model>-demo."""
    if config.space.space_id:
        return config.space.space_id
    owner = config.hub.organization or whoami(api, token).get("name")
    return f"{owner}/{config.model.name}-demo"


@flow(name="loraship-space-idle", log_prints=False)
def space_idle(config_path: str = "deployment_config.yaml", dry_run: bool = False) -> dict[str, Any]:
    """Pause or downgrade the demo Space after space.idle_hours idle hours; returns the decision record."""
    logger = logging.getLogger("loraship.space")  # an extra Prefect logger: reaches the UI in a flow run
    config = load_config(config_path)
    settings = config.space
    if settings.idle_hours is None:
        logger.info("space.idle_hours is not set in %s: nothing to do", config_path)
        return {"action": "none", "reason": "space.idle_hours is not set", "applied": False}
    if config.hub.token is None:
        raise ValueError("hub.token is needed to read and pause the Space (set it in the config)")
    token = config.hub.token.resolve(required=True).get_secret_value()
    api = hub_api(config.hub.endpoint, token)
    record = check_idle(api, space_id_for(config, api, token), settings, apply=not dry_run)
    logger.info("Space %s: %s (%s)", record["space_id"], record["action"], record["reason"])
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.space_idle", description=space_idle.description)
    p.add_argument("--config", default="deployment_config.yaml")
    p.add_argument("--dry-run", action="store_true", help="decide and report, change nothing")
    args = p.parse_args(argv)
    print(json.dumps(space_idle(args.config, args.dry_run), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
