"""What the flow hands every stage runner: the config, the run folder, what has been made so far."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from flows.config import PipelineConfig
from tasks.core.artifacts import Artifact
from tasks.core.run import RunFolder


@dataclass
class RunContext:
    config: PipelineConfig
    run: RunFolder
    dry_run: bool = False
    refresh: set[str] = field(default_factory=set)
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def bound(self, stage: str, task: Any) -> Any:
        """`task` bound to this run's cache folder, refreshed when --refresh names the stage."""
        from tasks.core.stage import bind

        return bind(task, self.run.cache_dir, refresh=stage in self.refresh or "all" in self.refresh)

    def call(self, stage: str, task: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a stage task bound to this run; remember whether Prefect answered from the cache."""
        state = self.bound(stage, task)(*args, return_state=True, **kwargs)
        self._note_state(stage, state)
        return state.result()

    def map(self, stage: str, task: Any, *args: Any, **kwargs: Any) -> list[Any]:
        """`task.map(...)` bound to this run (runs on the flow's task runner, in parallel); waits for all."""
        futures = self.bound(stage, task).map(*args, **kwargs)
        futures.wait()
        results = []
        errors = []
        for f in futures:
            self._note_state(stage, f.state)
            try:
                results.append(f.result())
            except Exception as exc:  # report every failed item, not only the first
                errors.append(exc)
        if errors:
            raise errors[0]
        return results

    def _note_state(self, stage: str, state: Any) -> None:
        hits = self.notes.setdefault("cache", {}).setdefault(stage, [])
        hits.append(getattr(state, "name", "") == "Cached")

    def all_cached(self, stage: str) -> bool:
        hits = self.notes.get("cache", {}).get(stage, [])
        return bool(hits) and all(hits)

    def of_kind(self, kind: str) -> list[Artifact]:
        return [a for a in self.artifacts.values() if a.kind == kind]


class StageOutcome(BaseModel):
    stage: str
    status: str
    seconds: float = 0.0
    message: str = ""
    artifacts: list[str] = Field(default_factory=list)


class RunSummary(BaseModel):
    model: str
    version: str
    run_dir: str
    manifest: str
    degraded: bool = False
    stages: list[StageOutcome] = Field(default_factory=list)
    artifacts: list[dict[str, Any]] = Field(default_factory=list)
    links: dict[str, str] = Field(default_factory=dict)
