"""The flow a `training.completed` event starts: event-shaped parameters in, the full pipeline out.

An event carries plain strings (model name, where the adapter is, the base model); the deployment's
trigger templates them into this flow's parameters (see deployments/prefect.yaml). This flow lays them
over a base deployment_config.yaml (or the defaults), validates the result like any config, and runs
the full pipeline as a sub-flow, tagged with the model and version.

An event is input from the network, so it chooses little: the model name, version, a Hub base model, a
host the base config allows and a path under an allowed root. A local source (a folder on the worker), a
local base model and a stage selection are refused unless the base config's `trigger:` section opts in.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import PurePosixPath
from typing import Any

from flows.env import prepare_environment

prepare_environment()

from prefect import flow, get_run_logger, tags  # noqa: E402

from flows.config import TriggerSettings, load_config, parse_config  # noqa: E402
from flows.full import full  # noqa: E402
from flows.orchestration import run_tags  # noqa: E402
from flows.summary import RunSummary  # noqa: E402
from flows.task_runners import configured_flow  # noqa: E402
from tasks.core.errors import ConfigError  # noqa: E402
from tasks.publish.allowlist import is_hub_id  # noqa: E402


def _stage_list(value: str | list[str] | None) -> list[str] | None:
    """`"download,merge"`, `"download merge"` or a list; empty: None (all enabled stages)."""
    if value is None:
        return None
    items = value if isinstance(value, list) else value.replace(",", " ").split()
    items = [s.strip() for s in items if s and s.strip()]
    return items or None


def _refuse(what: str, setting: str, why: str) -> ConfigError:
    return ConfigError(
        f"training.completed event refused: {what}",
        hint=f"{why}; to allow it, set {setting} in the base config (config_path / $LORASHIP_TRIGGER_CONFIG)",
    )


def _under(path: str, roots: list[str]) -> bool:
    """`path` is absolute, has no `..`, and lies in one of `roots` (compared after normalizing both)."""
    if not path.startswith("/") or ".." in PurePosixPath(path).parts:
        return False
    norm = posixpath.normpath(path)
    return any(norm == r or norm.startswith(r.rstrip("/") + "/") for r in (posixpath.normpath(x) for x in roots))


def _event_source(source: dict[str, Any], trigger: TriggerSettings, path: str, host: str, kind: str) -> None:
    """Lay the event's source values over the base config's `source` section, refusing what it may not choose."""
    base_kind = source.get("kind", "local")
    kind = kind or base_kind
    if kind != base_kind and kind != "local":
        raise _refuse(
            f"source_kind {kind!r} differs from the base config's {base_kind!r}",
            "source.kind",
            "an event does not choose how the worker reaches a training box",
        )
    if kind == "local" and (path or kind != base_kind) and not trigger.allow_local:
        raise _refuse(
            "a local source (a folder on the worker)",
            "trigger.allow_local: true",
            "an event could otherwise make the worker read and publish its own files",
        )
    source["kind"] = kind
    if host:
        if host in trigger.host_blocks:
            source.pop("host", None)
            source["host_block"] = host
        elif host == source.get("host") or host in trigger.allowed_hosts:
            source["host"] = host
        else:
            raise _refuse(f"host {host!r} is not allowed", "trigger.allowed_hosts (or trigger.host_blocks)", "")
    if path:
        roots = trigger.allowed_roots or ([source["path"]] if source.get("path") else [])
        if not _under(path, roots):
            raise _refuse(
                f"path {path!r} is not under an allowed root ({', '.join(roots) or 'none configured'})",
                "trigger.allowed_roots",
                "an event's path must be absolute, without '..', inside a folder the base config names",
            )
        source["path"] = posixpath.normpath(path)


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

    From the event only the model name, version, base model, a host the base config allows and a path
    under an allowed root are taken (`trigger:` in the base config says what is allowed; see
    TriggerSettings). Empty strings mean "keep the base config's value" (an event template renders a
    missing payload key as an empty string). The base config is `config_path`, else
    $LORASHIP_TRIGGER_CONFIG (set on the worker); `runs_dir` falls back to $LORASHIP_RUNS_DIR.
    """
    if not model_name:
        raise ConfigError(
            "the training.completed event has no model name",
            hint="send payload.model (python -m deployments.notify --model NAME ...)",
        )
    config_path = config_path or os.environ.get("LORASHIP_TRIGGER_CONFIG", "")
    base = load_config(config_path) if config_path else None
    data: dict[str, Any] = base.model_dump(mode="json", exclude_unset=True) if base else {}
    trigger = base.trigger if base else TriggerSettings()
    data.setdefault("model", {})["name"] = model_name
    if version:
        data["model"]["version"] = version
    if base_model:
        if not (trigger.allow_local or is_hub_id(base_model)):
            raise _refuse(
                f"base_model {base_model!r} is not a Hub id (owner/name)",
                "trigger.allow_local: true",
                "a local base model folder from an event would let it choose files on the worker",
            )
        data["model"]["base_model"] = base_model
        data.setdefault("merge", {})["base_model"] = base_model
    _event_source(data.setdefault("source", {}), trigger, path, host, source_kind)
    runs_dir = runs_dir or os.environ.get("LORASHIP_RUNS_DIR", "")
    if runs_dir:
        data.setdefault("pipeline", {})["runs_dir"] = runs_dir
    return parse_config(data, "training.completed event").model_dump(mode="json")


def event_stages(only: str | list[str] | None, config: dict[str, Any]) -> list[str] | None:
    """The stages an event asked for (`payload.only`): refused unless the base config allows it."""
    stages = _stage_list(only)
    if stages and not parse_config(config).trigger.allow_stage_selection:
        raise _refuse(
            f"a stage selection ({', '.join(stages)})",
            "trigger.allow_stage_selection: true",
            "an event runs the stages the base config enables",
        )
    return stages


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
    stages = event_stages(only, config)
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
        return configured_flow(full, cfg)(config=config, only=stages, dry_run=dry_run)
