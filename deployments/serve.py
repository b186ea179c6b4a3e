"""One host, no worker: serve the loraship deployments from this process (`prefect.serve`).

    python -m deployments.serve                      # all of them, as defined in deployments/prefect.yaml
    python -m deployments.serve --cron "30 2 * * *"  # another time for the nightly health + eval

The deployments (names, parameters, schedule, the `training.completed` trigger with its templated
parameters) are read from deployments/prefect.yaml, so the served ones and the worker-run ones cannot
drift apart. Runs execute as subprocesses of this process in its working directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

from flows.env import prepare_environment

prepare_environment()

import yaml  # noqa: E402

PREFECT_YAML = Path(__file__).with_name("prefect.yaml")
ROOT = Path(__file__).resolve().parent.parent


def deployment_specs(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The `deployments:` entries of prefect.yaml (YAML anchors resolved by the loader)."""
    return list((yaml.safe_load(path.read_text()) or {}).get("deployments") or [])


def _load_flow(entrypoint: str) -> Any:
    file, _, name = entrypoint.partition(":")
    module = ".".join(Path(file).with_suffix("").parts)
    if importlib.util.find_spec(module) is None:  # pragma: no cover - run from elsewhere
        raise SystemExit(f"cannot import {module}: run from the repository root or install loraship")
    return getattr(importlib.import_module(module), name)


def build_deployments(
    specs: list[dict[str, Any]] | None = None, cron: str | None = None, names: list[str] | None = None
) -> list[Any]:
    """RunnerDeployments for `prefect.serve`, with the schedules and event triggers of prefect.yaml."""
    from prefect.events import DeploymentEventTrigger

    out = []
    for spec in specs if specs is not None else deployment_specs():
        if names and spec["name"] not in names:
            continue
        flow = _load_flow(spec["entrypoint"])
        kwargs: dict[str, Any] = {
            "name": spec["name"],
            "parameters": spec.get("parameters") or {},
            "tags": spec.get("tags") or [],
            "description": spec.get("description"),
        }
        schedules = spec.get("schedules") or []
        if schedules:
            from prefect.schedules import Cron

            kwargs["schedules"] = [
                Cron(
                    (cron if spec["name"] == "loraship-nightly-health" else None) or s["cron"],
                    timezone=s.get("timezone") or "UTC",
                    active=s.get("active", True),
                )
                for s in schedules[:1]
            ]
        triggers = []
        for t in spec.get("triggers") or []:
            if t.get("type", "event") != "event":
                continue
            triggers.append(
                DeploymentEventTrigger(
                    enabled=t.get("enabled", True),
                    match=t.get("match") or {},
                    expect=set(t.get("expect") or []),
                    parameters=t.get("parameters"),
                )
            )
        if triggers:
            kwargs["triggers"] = triggers
        if spec.get("concurrency_limit"):
            kwargs["concurrency_limit"] = spec["concurrency_limit"]
        out.append(flow.to_deployment(**kwargs))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m deployments.serve",
        description=(
            "Serve the loraship deployments (full, nightly health + eval, training.completed trigger) from this "
            "process; no worker needed."
        ),
    )
    p.add_argument("--cron", help="cron for the nightly health + eval deployment (default: the one in prefect.yaml)")
    p.add_argument("--deployment", nargs="+", metavar="NAME", help="serve only these deployments")
    p.add_argument("--limit", type=int, default=None, help="flow runs at a time (default: unlimited)")
    args = p.parse_args(argv)
    from prefect import serve

    deployments = build_deployments(cron=args.cron, names=args.deployment)
    if not deployments:
        print("no deployment matched --deployment", file=sys.stderr)
        return 2
    serve(*deployments, limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
