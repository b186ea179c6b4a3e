"""The flow a `training.completed` event starts: event-shaped parameters in, the full pipeline out.

An event carries plain strings (model name, where the adapter is, the base model); the deployment's
trigger templates them into this flow's parameters (see deployments/prefect.yaml). This flow lays them
over a base deployment_config.yaml (or the defaults), validates the result like any config, and runs
the full pipeline as a sub-flow, tagged with the model and version.
"""

from __future__ import annotations

import os
from typing import Any

from flows.env import prepare_environment

prepare_environment()

from prefect import flow, get_run_logger, tags  # noqa: E402

from flows.config import load_config, parse_config  # noqa: E402
from flows.full import full  # noqa: E402
from flows.orchestration import run_tags  # noqa: E402
from flows.summary import RunSummary  # noqa: E402
from flows.task_runners import configured_flow  # noqa: E402
from tasks.core.errors import ConfigError  # noqa: E402


def _stage_list(value: str | list[str] | None) -> list[str] | None:
    """`"download,merge"`, `"download merge"` or a list; empty: None (all enabled stages)."""
    if value is None:
        return None
    items = value if isinstance(value, list) else value.replace(",", " ").split()
    items = [s.strip() for s in items if s and s.strip()]
    return items or None


def build_config(
    model_name: str,
    path: str,
    source_kind: str = "",
    host: str = "",
    base_model: str = "",
    version: str = "",
    config_path: str = "",
    runs_dir: str = "",
) -> dict[str, Any]:
    """The pipeline config for one training run: the base config with the event's values laid over it.

    Empty strings mean "keep the base config's value" (an event template renders a missing payload key
    as an empty string). `runs_dir` falls back to $LORASHIP_RUNS_DIR (set on the worker or work pool).
    """
    if not model_name:
        raise ConfigError(
            "the training.completed event has no model name",
            hint="send payload.model (python -m deployments.notify --model NAME ...)",
        )
    data: dict[str, Any] = load_config(config_path).model_dump(mode="json", exclude_unset=True) if config_path else {}
    data.setdefault("model", {})["name"] = model_name
    if version:
        data["model"]["version"] = version
    if base_model:
        data["model"]["base_model"] = base_model
        data.setdefault("merge", {})["base_model"] = base_model
    source = data.setdefault("source", {})
    if source_kind:
        source["kind"] = source_kind
    if path:
        source["path"] = path
    if host:
        # The download stage's source settings name the host field; `host` is the SSH host or vast.ai instance.
        source["host"] = host
    runs_dir = runs_dir or os.environ.get("LORASHIP_RUNS_DIR", "")
    if runs_dir:
        data.setdefault("pipeline", {})["runs_dir"] = runs_dir
    return parse_config(data, "training.completed event").model_dump(mode="json")


@flow(name="loraship-triggered", log_prints=True)
def triggered(
    model_name: str,
    path: str,
    source_kind: str = "",
    host: str = "",
    base_model: str = "",
    version: str = "",
    config_path: str = "",
    runs_dir: str = "",
    only: str = "",
    dry_run: bool = False,
) -> RunSummary:
    """Run the pipeline for a training run that just finished (parameters come from the event payload)."""
    logger = get_run_logger()
    config = build_config(
        model_name,
        path,
        source_kind=source_kind,
        host=host,
        base_model=base_model,
        version=version,
        config_path=config_path,
        runs_dir=runs_dir,
    )
    cfg = parse_config(config)
    logger.info(
        "training.completed for %s %s: %s %s%s",
        cfg.model.name,
        cfg.model.version,
        cfg.source.kind,
        f"{host}:" if host else "",
        cfg.source.path,
    )
    with tags(*run_tags(cfg)):
        return configured_flow(full, cfg)(config=config, only=_stage_list(only), dry_run=dry_run)
