"""What a run reports: one outcome per stage, links, the artifact table (terminal, UI, notifications)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from tasks.core.vocab import StageStatus


class StageOutcome(BaseModel):
    stage: str
    status: StageStatus
    seconds: float = 0.0
    message: str = ""
    artifacts: list[str] = Field(default_factory=list)
    started_at: float | None = Field(None, description="wall clock (epoch seconds) when the stage started")
    ended_at: float | None = Field(None, description="... and when it ended (stages overlap in a DAG run)")


class RunSummary(BaseModel):
    model: str
    version: str
    run_dir: str
    manifest: str
    log_dir: str = Field("", description="the run's log files: pipeline.log, summary.log, <stage>.log")
    logs_removed: int = Field(0, description="runs whose logs logging.retention_days removed at the start of this run")
    degraded: bool = False
    stages: list[StageOutcome] = Field(default_factory=list)
    artifacts: list[dict[str, Any]] = Field(default_factory=list)
    links: dict[str, str] = Field(default_factory=dict)
    superseded: dict[str, str] = Field(
        default_factory=dict, description="artifacts that left the lineage in this run -> why (see the manifest)"
    )
    gate: dict[str, Any] | None = Field(None, description="the release gate's decision (reports/gate.json)")
    task_runners: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per fanned-out stage: the task runner, and on Dask the workers that ran its items",
    )
