"""deployment_config.yaml: the user's one file, validated before any work.

Each stage module owns its Settings model; this module composes them with the pipeline-wide sections.
Errors name the field's path (e.g. `quantization.types[1]`) and what to write instead, and unknown keys
suggest the closest valid one.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from flows.stages import CRITICAL_STAGES, SECTION_OWNERS, STAGES, TABLE
from tasks.core.errors import ConfigError
from tasks.core.runlog import LoggingSettings
from tasks.core.settings import SecretRef, StrictModel
from tasks.core.vocab import Stage
from tasks.release.gate import GateSettings

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class ModelSettings(StrictModel):
    name: str = Field(description="the model's short name: files are named {name}-{QUANT}.gguf")
    version: str = Field("v1", description="run folder: runs/<name>/<version>")
    base_model: str = Field("", description="base model id or folder (for the card and the merge)")
    description: str = ""

    @field_validator("name", "version")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it becomes a folder and file name)")
        return v


class NotificationSettings(StrictModel):
    """Saved Prefect notification blocks (Slack, Discord, Teams, email, custom webhook) to tell about a run.

    A name is `block-type-slug/block-name` (e.g. `slack-webhook/ml-team`) or a bare block name that is
    looked up among the saved notification blocks. Sending is best effort: a failed notification is
    logged and never changes the run's result.
    """

    on_completion: list[str] = Field(
        default_factory=list, description="notification blocks told when a run completes (degraded or not)"
    )
    on_failure: list[str] = Field(default_factory=list, description="notification blocks told when a run fails")
    on_degraded: list[str] = Field(
        default_factory=list,
        description="notification blocks told when a run completes degraded (a non-critical stage failed)",
    )
    ui_url: str = Field("", description="base URL of the Prefect UI for links in messages (default: PREFECT_UI_URL)")


class CleanupSettings(StrictModel):
    delete_f16: bool = Field(False, description="delete the F16 GGUF once the quantizations are validated")
    delete_merged: bool = Field(False, description="delete merged/ once converted")
    delete_superseded: bool = Field(
        False,
        description=(
            "delete the files of artifacts that left the run's lineage (a dropped quantization, the GGUFs of a "
            "retrained adapter's predecessor); their manifest records stay, marked superseded"
        ),
    )


class PipelineSettings(StrictModel):
    runs_dir: str = Field("runs", description="where run folders are made (relative to the working directory)")
    stages: list[Stage] = Field(default_factory=lambda: list(STAGES), description="stages enabled, in any order")
    continue_on_error: bool = Field(
        False, description="a failing non-critical stage degrades the run instead of failing it"
    )
    cleanup: CleanupSettings = Field(default_factory=CleanupSettings)
    max_parallel_stages: int | None = Field(
        None, ge=1, description="stages running at once (None: as many as the graph allows; 1: one after another)"
    )
    gate: GateSettings | None = Field(
        None, description="the release gate: health and per-quantization limits a release needs; unset: all ship"
    )
    approval: bool = Field(
        False, description="pause before publishing until a person approves in the Prefect UI or through its API"
    )
    approval_timeout_s: int = Field(86400, ge=1, description="seconds to wait for the approval; then nothing ships")

    @field_validator("stages", mode="before")
    @classmethod
    def _known_stages(cls, v: Any) -> Any:
        for s in v if isinstance(v, list) else []:
            if s not in STAGES:
                raise ValueError(f"unknown stage {s!r}{_suggest(s, STAGES)}; stages are: {', '.join(STAGES)}")
        return v


class TriggerSettings(StrictModel):
    """What a `training.completed` event may choose when this file is the base config of the triggered
    deployment (flows/triggered.py). By default an event names only the model, version, Hub base model,
    one of the allowed hosts and a path under an allowed root; everything else comes from this file."""

    allowed_hosts: list[str] = Field(
        default_factory=list, description="SSH hosts an event may name (besides source.host of this file)"
    )
    host_blocks: list[str] = Field(
        default_factory=list, description="saved TrainingHost block names an event may name as its host"
    )
    allowed_roots: list[str] = Field(
        default_factory=list,
        description="folders an event's path must lie under; empty: under this file's source.path",
    )
    allow_local: bool = Field(
        False,
        description=(
            "let an event use the local source (a folder on the worker) and a local base model; off: an event "
            "cannot make the worker read (and publish) its own files"
        ),
    )
    allow_stage_selection: bool = Field(False, description="let an event choose the stages to run (payload.only)")


class PerformanceSettings(StrictModel):
    threads: int | None = Field(None, ge=1, description="threads for heavy work; None: all cores")
    parallelism: int | None = Field(
        None, ge=1, description="parallel quantize jobs; None: chosen from cores and memory"
    )
    concurrency_limit: str = Field(
        "loraship-heavy",
        description=(
            "Prefect global concurrency limit held around heavy stages (merge, quantize); empty: none. A limit "
            "that does not exist is not waited for"
        ),
    )
    concurrency_slots: int | None = Field(
        None,
        ge=1,
        description=(
            "create or resize the limit to this many slots at the start of a run; None: use the limit as saved "
            "(or none)"
        ),
    )
    task_runner: Literal["thread", "dask"] = Field(
        "thread", description="task runner for the quantize fan-out: thread (default) or dask (needs prefect-dask)"
    )
    dask_address: str = Field(
        "", description="address of an existing Dask scheduler (tcp://host:8786); empty: a local Dask cluster"
    )
    dask_processes: bool = Field(
        False,
        description=(
            "local Dask cluster: worker processes instead of threads of this process (needs a real Prefect "
            "server: PREFECT_API_URL)"
        ),
    )


class _PipelineBase(StrictModel):
    """The whole deployment_config.yaml: `model`, one section per stage (from the stage table), then the
    pipeline-wide sections. The class is built by `_build_config_model` below."""

    @model_validator(mode="after")
    def _combinations(self) -> _PipelineBase:
        enabled = set(self.pipeline.stages)
        if self.pipeline.cleanup.delete_f16 and Stage.EVALUATE in enabled:
            raise ValueError(
                "pipeline.cleanup.delete_f16 with the evaluate stage: eval compares against the F16; set "
                "delete_f16: false or drop 'evaluate' from pipeline.stages"
            )
        return self

    def run_dir(self) -> Path:
        return Path(self.pipeline.runs_dir) / self.model.name / self.model.version


def _build_config_model() -> type[_PipelineBase]:
    """PipelineConfig from the stage table: a stage's section is required when its row says so (`source`),
    else it defaults to its Settings model's defaults."""
    fields: dict[str, Any] = {"model": (ModelSettings, ...)}
    for spec in (s for s in TABLE if s.section and s.settings):
        default = ... if spec.required else Field(default_factory=spec.settings)
        fields[spec.section] = (spec.settings, default)
    fields |= {
        "notifications": (NotificationSettings, Field(default_factory=NotificationSettings)),
        "logging": (LoggingSettings, Field(default_factory=LoggingSettings)),
        "pipeline": (PipelineSettings, Field(default_factory=PipelineSettings)),
        "performance": (PerformanceSettings, Field(default_factory=PerformanceSettings)),
        "trigger": (TriggerSettings, Field(default_factory=TriggerSettings)),
    }
    return create_model("PipelineConfig", __base__=_PipelineBase, __module__=__name__, **fields)


PipelineConfig = _build_config_model()
# Where each section's model comes from, for the config reference: the stages' from the table.
SECTION_OWNERS: dict[str, str] = {
    "model": "flows/config.py",
    **SECTION_OWNERS,
    "logging": "tasks/core/runlog.py",
    **{k: "flows/config.py" for k in ("notifications", "pipeline", "performance", "trigger")},
}


def _suggest(word: str, options: Any) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    model: Any = PipelineConfig
    for part in path:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model = field.annotation
        for arg in getattr(model, "__args__", ()) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                model = arg
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} problem(s) in the configuration:"]
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in ("function-after", "function-before"))
        where = _loc(loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            options = list(parent.model_fields) if parent else []
            msg = (
                f"unknown key{_suggest(loc[-1], options)}; valid keys here: {', '.join(options)}"
                if options
                else "unknown key"
            )
        elif e["type"] == "missing":
            msg = "required: add this key"
        elif "input" in e and e["type"].endswith(("_type", "_parsing", "literal_error", "enum")):
            msg += f" (got {e['input']!r})"
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "config") -> PipelineConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (model:, source:, ...)")
    # An empty section (`performance:` with everything commented out) means "all defaults".
    data = {k: ({} if v is None and k in PipelineConfig.model_fields else v) for k, v in data.items()}
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def _expand_env(text: str) -> str:
    """`${VAR}` and `${VAR:-default}` in the YAML are replaced (not for secrets: those are references)."""

    def sub(m: re.Match[str]) -> str:
        name, _, default = m.group(1).partition(":-")
        return os.environ.get(name, default)

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?)\}", sub, text)


def read_config_data(path: Path | str) -> dict[str, Any]:
    """The raw mapping of a deployment_config.yaml (environment variables expanded), not yet validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist",
            hint=(
                "pass --config with the path of your deployment_config.yaml (see "
                "deployments/deployment_config.example.yaml)"
            ),
        )
    try:
        data = yaml.safe_load(_expand_env(path.read_text())) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the config must be a mapping of sections (model:, source:, ...), not {type(data).__name__}"
        )
    return data


def load_config(path: Path | str) -> PipelineConfig:
    """Read and validate a deployment_config.yaml; relative paths inside stay relative to the CWD."""
    return parse_config(read_config_data(path), str(path))


__all__ = [
    "PipelineConfig",
    "load_config",
    "read_config_data",
    "parse_config",
    "STAGES",
    "CRITICAL_STAGES",
    "SecretRef",
]
