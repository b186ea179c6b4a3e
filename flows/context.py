"""What the flow hands every stage runner: the config, the run folder, and the run's lineage.

The flow keeps one RunContext for the run; each stage gets `for_stage(stage)`, a view whose `artifacts`
holds only what that stage's upstream stages made in this run or carried from the manifest as still
current (tasks/core/lineage.py). Notes (messages, links, cleanups) are shared by all the views.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flows.stages import SPECS, Caching, ancestors
from flows.task_runners import describe_task_runner, prepare_task_runner
from tasks.core.artifacts import Artifact
from tasks.core.lineage import Lineage
from tasks.core.run import RunFolder
from tasks.core.vocab import ArtifactKind, Stage

if TYPE_CHECKING:
    from flows.config import PipelineConfig


@dataclass
class RunContext:
    config: PipelineConfig
    run: RunFolder
    dry_run: bool = False
    refresh: set[str] = field(default_factory=set)
    artifacts: dict[str, Artifact] = field(default_factory=dict)  # what this stage may read (see for_stage)
    notes: dict[str, Any] = field(default_factory=dict)
    lineage: Lineage = field(default_factory=Lineage)  # the run's current artifacts, shared by every view
    records: dict[str, Artifact] = field(default_factory=dict)  # the manifest's records at the start of the run
    results: dict[Stage, Any] = field(default_factory=dict)  # StageResult per stage, written by its task
    selected: tuple[Stage, ...] = ()  # the stages this run runs (hub_push puts the Space to come in the cards)

    def for_stage(self, stage: Stage) -> RunContext:
        """The view a stage's runner gets: the lineage's artifacts made by its upstream stages, nothing else."""
        mine = ancestors(stage, config=self.config)
        view = {n: a for n, a in self.lineage.artifacts.items() if a.stage in mine}
        return dataclasses.replace(self, artifacts=view)

    def bound(self, stage: str, task: Any) -> Any:
        """`task` bound to this run's cache folder, refreshed when --refresh names the stage; a stage whose
        row does not cache by content (flows/stages.py `cache`) never answers from the cache."""
        from tasks.core.stage import bind

        spec = SPECS.get(Stage(stage)) if stage in SPECS else None
        if spec is not None and spec.cache != Caching.CONTENT:
            from prefect.cache_policies import NO_CACHE

            task = task.with_options(cache_policy=NO_CACHE, persist_result=False)
        return bind(task, self.run.cache_dir, refresh=stage in self.refresh or "all" in self.refresh)

    def call(self, stage: str, task: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Run a stage task bound to this run; remember whether Prefect answered from the cache.

        `stage` and `task` are positional-only, so a stage task may itself take arguments of those names
        (space_task's `task=`: the model's pipeline task)."""
        state = self.bound(stage, task)(*args, return_state=True, **kwargs)
        self._note_state(stage, state)
        return state.result()

    def map(self, stage: str, task: Any, /, *args: Any, **kwargs: Any) -> list[Any]:
        """`task.map(...)` bound to this run (runs on the flow's task runner, in parallel); waits for all."""
        self._prepare_runner()
        futures = self.bound(stage, task).map(*args, **kwargs)
        futures.wait()
        self._note_runner(stage, futures)
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

    def _prepare_runner(self) -> None:
        from prefect.context import FlowRunContext

        runner = getattr(FlowRunContext.get(), "task_runner", None)
        if runner is not None:
            prepare_task_runner(runner, self.config.logging.level)

    def _note_runner(self, stage: str, futures: Any) -> None:
        """Record which task runner ran the fan-out and, on Dask, which workers ran the items (best effort)."""
        try:
            from prefect.context import FlowRunContext

            flow_ctx = FlowRunContext.get()
            runner = getattr(flow_ctx, "task_runner", None)
            if runner is None:
                return
            info = describe_task_runner(runner)
            wrapped = [getattr(f, "wrapped_future", None) for f in futures]
            if info["runner"] == "DaskTaskRunner" and wrapped and all(w is not None for w in wrapped):
                client = runner.client
                holders = client.who_has(wrapped)  # the worker that ran an item holds its result
                info["items"] = [
                    {"task_run_id": str(f.task_run_id), "workers": list(holders.get(w.key, ()))}
                    for f, w in zip(futures, wrapped)
                ]
                used = sorted({a for item in info["items"] for a in item["workers"]})
                known = client.scheduler_info(n_workers=-1).get("workers", {})
                pids = client.run(os.getpid, workers=used) if used else {}
                info["workers"] = [
                    {"address": a, "name": str(known.get(a, {}).get("name", "")), "pid": pids.get(a)} for a in used
                ]
            self.notes.setdefault("task_runner", {})[stage] = info
        except Exception as exc:  # a record of where things ran must never fail the stage
            import logging

            logging.getLogger("loraship.orchestration").debug("task runner not recorded: %s", exc)

    def _note_state(self, stage: str, state: Any) -> None:
        hits = self.notes.setdefault("cache", {}).setdefault(stage, [])
        hits.append(getattr(state, "name", "") == "Cached")

    def all_cached(self, stage: str) -> bool:
        hits = self.notes.get("cache", {}).get(stage, [])
        return bool(hits) and all(hits)

    def of_kind(self, kind: ArtifactKind) -> list[Artifact]:
        return [a for a in self.artifacts.values() if a.kind == kind]
