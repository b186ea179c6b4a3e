"""The stage table run as a graph on Prefect: each stage a task run that waits for its real upstreams.

The flow thread walks the table: a stage is settled when all its upstreams are. A stage that runs in
this run is submitted as a Prefect task (`stage:<name>`) to a thread pool of its own with `wait_for` its
upstreams' task runs, so independent branches run at the same time and the Prefect UI draws the graph;
the stage's own work (cached, retried) runs inside it as child task runs, and its fan-outs (quantize) go
to the flow's task runner (threads or Dask). A stage that does not run this time (not selected, disabled)
is settled by carrying its manifest records that are still in the lineage (tasks/core/lineage.py): once its
upstreams are settled when it has records to judge, at once when it has none (so `--skip template_contract`
lets the Hub push run beside local_deploy).
A stage whose hard upstream failed, or was skipped because of one, or was blocked (the release gate
withheld everything), is skipped with that reason; dependants of a soft upstream run regardless.

`pipeline.max_parallel_stages` caps how many stages run at once (1: one after another, in table order).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flows.stages import SPECS, STAGES
from tasks.core.artifacts import Artifact
from tasks.core.vocab import Stage, StageStatus

if TYPE_CHECKING:
    from flows.context import RunContext


@dataclass
class StageResult:
    """What the flow knows about a stage once it is settled."""

    stage: Stage
    status: StageStatus | None  # None: not run in this run (its records were carried)
    seconds: float = 0.0
    message: str = ""
    artifacts: list[Artifact] = field(default_factory=list)
    blocks: str | None = None  # why dependants (through `needs`) must not run; None: they may
    error: BaseException | None = None
    fatal: bool = False  # the run fails (a critical stage, or continue_on_error is off)
    started_at: float = 0.0  # time.time() around the runner, for the summary and benchmarks
    ended_at: float = 0.0


Execute = Callable[["RunContext", Stage], StageResult]


def _stage_task() -> Any:
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    def stage(name: str, ctx: Any, execute: Any) -> Any:
        """One stage of the pipeline: its runner, the cached/retried stage tasks inside it."""
        from prefect.states import Completed

        result = execute(ctx, Stage(name))
        ctx.results[Stage(name)] = result
        if result.error is not None:
            raise result.error  # the task run ends Failed in the UI with the stage's error
        if result.status == StageStatus.SKIPPED:
            return Completed(name="Skipped", message=result.message)
        return [a.name for a in result.artifacts]

    return task(name="stage", cache_policy=NO_CACHE, persist_result=False, retries=0)(stage)


def run_graph(
    ctx: RunContext,
    selected: list[Stage],
    execute: Execute,
    carry: Callable[[Stage], StageResult],
    settled: Callable[[StageResult], None],
    max_parallel: int | None = None,
) -> dict[Stage, StageResult]:
    """Settle every stage of the table in dependency order; returns the results of those settled.

    `execute(ctx_for_stage, stage)` runs a selected stage (inside its Prefect task); `carry(stage)` settles
    one that is not selected; `settled(result)` is called in the flow thread as each one settles (the
    manifest and the summary are written there, one at a time). After a fatal failure nothing new starts;
    the stages already running finish, and the function returns.
    """
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect.utilities.annotations import allow_failure, quote

    task = _stage_task()
    results: dict[Stage, StageResult] = {}
    futures: dict[Stage, Any] = {}  # running
    submitted: dict[Stage, Any] = {}  # every stage future, for wait_for (the UI's edges)
    pending = [s for s in STAGES]
    fatal = False
    limit = max_parallel or len(STAGES)

    def hollow(s: Stage) -> bool:
        """Not run here and nothing recorded: settles at once, with nothing for a dependant to read."""
        return s not in selected and not any(a.stage == s for a in ctx.records.values())

    def through(u: Stage) -> list[Stage]:
        """What a hard dependency on `u` means when `u` is hollow: a dependency on what `u` itself needs, so
        a stage never starts before (or despite the failure of) a stage that runs further up its chain."""
        return [u] if not hollow(u) else [n for v in SPECS[u].needs for n in through(v)]

    def edges(s: Stage) -> tuple[list[Stage], list[Stage]]:
        """(what `s` waits for, which of those it needs). A `uses` edge to a hollow stage is dropped (nothing
        to use); a `needs` edge to one passes through to that stage's own needs."""
        spec = SPECS[s]
        waits: list[Stage] = []
        needs: list[Stage] = []
        for u in spec.upstream_for(ctx.config):
            if u in spec.needs:
                needs += [n for n in through(u) if n not in needs]
            elif not hollow(u):
                waits.append(u)
        return waits + [n for n in needs if n not in waits], needs

    with ThreadPoolTaskRunner(max_workers=len(STAGES)) as pool:
        while True:
            for s in list(pending):
                if fatal:
                    break
                upstream, needs = edges(s)
                # a stage that does not run waits for its upstreams only to judge its records against them
                # (lineage); with no records there is nothing to judge: it settles at once, and its dependants
                # wait for what it would have waited for (edges)
                if not hollow(s) and any(u not in results for u in upstream):
                    continue
                if s in selected and len(futures) >= limit:
                    break  # in table order: with max_parallel 1 the stages run one after another
                pending.remove(s)
                blocked = None if s not in selected else next((u for u in needs if results[u].blocks), None)
                if s not in selected:
                    res = carry(s)
                elif blocked is not None:
                    why = f"{blocked}: {results[blocked].blocks}"
                    res = StageResult(s, StageStatus.SKIPPED, message=f"skipped because {why}", blocks=why)
                else:
                    # allow_failure: a degraded upstream (failed, continue_on_error) must not stop a stage that
                    # only `uses` it; blocking through `needs` is decided above, from the results
                    waits = [allow_failure(submitted[u]) for u in upstream if u in submitted]
                    params = {"name": str(s), "ctx": quote(ctx.for_stage(s)), "execute": quote(execute)}
                    futures[s] = submitted[s] = pool.submit(
                        task.with_options(task_run_name=f"stage:{s}"), params, wait_for=waits
                    )
                    continue
                results[s] = res
                settled(res)
            if not futures:
                if not pending or fatal:
                    break
                if all(any(u not in results for u in edges(s)[0]) for s in pending):
                    raise RuntimeError(f"stage graph stuck: {pending} wait for stages that never settle")
                continue
            done, _ = concurrent.futures.wait(
                [f.wrapped_future for f in futures.values()], return_when=concurrent.futures.FIRST_COMPLETED
            )
            for s, f in list(futures.items()):
                if f.wrapped_future not in done:
                    continue
                del futures[s]
                res = ctx.results.get(s)
                if res is None:  # the task never reached the runner (cancelled, crashed engine)
                    state = f.wrapped_future.result()
                    res = StageResult(
                        s,
                        StageStatus.FAILED,
                        message=f"the stage's task ended {getattr(state, 'name', state)} without a result",
                        blocks="did not run",
                        fatal=True,
                        error=RuntimeError(f"stage {s} did not run: {getattr(state, 'message', '')}"),
                    )
                results[s] = res
                settled(res)
                fatal = fatal or res.fatal
    return results
