"""Run-level Prefect plumbing around the pipeline: tags, the heavy-stage concurrency limit, the task
runner choice, the run summary as a markdown artifact, and cleanup of intermediates.

All of it is Prefect's own machinery (tags, global concurrency limits, task runners, artifacts); this
module only decides names and when to use them. None of it may fail a run that otherwise succeeded,
except a task runner that was asked for and cannot be made (that is a configuration error).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from tasks.core.errors import PermanentError

if TYPE_CHECKING:
    from flows.config import PipelineConfig
    from flows.context import RunSummary
    from tasks.core.artifacts import Artifact

log = logging.getLogger("loraship.orchestration")

# Stages that load a whole model or saturate the cores: at most `concurrency_slots` of them run at once
# across all flow runs that share the Prefect server (several models on one machine).
HEAVY_STAGES: frozenset[str] = frozenset({"merge", "quantize"})


def run_tags(cfg: "PipelineConfig") -> list[str]:
    return [f"model:{cfg.model.name}", f"version:{cfg.model.version}", "loraship"]


def tag_current_flow_run(cfg: "PipelineConfig") -> list[str]:
    """Add model/version tags to the running flow run (a UI filter); best effort."""
    wanted = run_tags(cfg)
    try:
        from prefect.client.orchestration import get_client
        from prefect.runtime import flow_run

        if not flow_run.id:
            return []
        tags = sorted(set(flow_run.tags or []) | set(wanted))
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, tags=tags)
        return tags
    except Exception as exc:  # pragma: no cover - UI nicety
        log.debug("flow run not tagged: %s", exc)
        return []


def ensure_concurrency_limit(cfg: "PipelineConfig") -> None:
    """Create (or resize) the heavy-stage limit when `performance.concurrency_slots` asks for it."""
    perf = cfg.performance
    if not perf.concurrency_limit or not perf.concurrency_slots:
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(perf.concurrency_limit, perf.concurrency_slots)
    log.info("global concurrency limit %r: %d slot(s)", perf.concurrency_limit, perf.concurrency_slots)


@contextlib.contextmanager
def stage_slot(cfg: "PipelineConfig", stage: str) -> Iterator[None]:
    """Hold one slot of the heavy-stage limit while a heavy stage runs.

    Non-strict: when no limit of that name exists the stage runs at once (nothing to wait for), so a
    fresh server never hangs a run. Create it with `prefect gcl create loraship-heavy --limit 1` or
    `performance.concurrency_slots`.
    """
    name = cfg.performance.concurrency_limit
    if stage not in HEAVY_STAGES or not name:
        yield
        return
    if not _limit_exists(name):
        log.info("%s: no global concurrency limit %r, not limited (create it: prefect gcl create %s --limit 1)", stage, name, name)
        yield
        return
    from prefect.concurrency.sync import concurrency

    # The lease outlives a long merge: renewed in the background; a failed renewal must not kill it.
    with concurrency(name, occupy=1, strict=False, lease_duration=600, raise_on_lease_renewal_failure=False):
        yield


def _limit_exists(name: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(name)
        return True
    except ObjectNotFound:
        return False


def task_runner_for(cfg: "PipelineConfig") -> Any | None:
    """The task runner the config asks for (None: the flow's default thread pool)."""
    perf = cfg.performance
    if perf.task_runner == "thread":
        if perf.parallelism:
            from prefect.task_runners import ThreadPoolTaskRunner

            return ThreadPoolTaskRunner(max_workers=perf.parallelism)
        return None
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise PermanentError(
            "performance.task_runner is 'dask' but prefect-dask is not installed",
            hint="pip install dask distributed && pip install --no-deps prefect-dask (its own pins would replace prefect), or set performance.task_runner: thread",
        ) from None
    if perf.dask_address:
        return DaskTaskRunner(address=perf.dask_address)
    kwargs: dict[str, Any] = {"processes": perf.dask_processes}
    if perf.dask_processes:
        # One job per worker process at a time; llama.cpp's own threads do the parallel work inside it.
        kwargs["threads_per_worker"] = 1
        if perf.parallelism:
            kwargs["n_workers"] = perf.parallelism
        if not _api_url():
            log.warning(
                "performance.dask_processes without a Prefect server (PREFECT_API_URL unset): every Dask worker "
                "process starts its own temporary API, which is slow; run `prefect server start` and export PREFECT_API_URL"
            )
    else:
        kwargs["n_workers"] = 1  # threads of this process (llama.cpp releases the GIL), like the default runner
        if perf.parallelism:
            kwargs["threads_per_worker"] = perf.parallelism
    return DaskTaskRunner(cluster_kwargs=kwargs)


def apply_log_level(level: str) -> None:
    """`logging.level` for the project's loggers (Prefect's root logger stays at WARNING for libraries)."""
    logging.getLogger("loraship").setLevel(level)


def prepare_task_runner(runner: Any, level: str) -> None:
    """Before a fan-out: Dask workers (other processes, maybe other machines) get the same log levels."""
    if type(runner).__name__ != "DaskTaskRunner":
        return
    from distributed.diagnostics.plugin import WorkerPlugin

    class LoraShipLogging(WorkerPlugin):
        """Sets the project's log level in each worker; llama.cpp's per-tensor lines only when debugging
        (llama-cpp-python 0.3.36 maps ggml's INFO to WARNING, so its own WARNING threshold lets them through)."""

        name = "loraship-logging"

        def __init__(self, level: str) -> None:
            self.level = level

        def setup(self, worker: Any) -> None:
            import logging as _logging

            _logging.getLogger("loraship").setLevel(self.level)
            _logging.getLogger("llama-cpp-python").setLevel(_logging.DEBUG if self.level == "DEBUG" else _logging.ERROR)

    runner.client.register_plugin(LoraShipLogging(level), name="loraship-logging")


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value() or "")


def describe_task_runner(runner: Any) -> dict[str, Any]:
    """What ran a fan-out, for the run record: runner type, and for Dask the scheduler and cluster kind."""
    info: dict[str, Any] = {"runner": type(runner).__name__}
    if info["runner"] == "DaskTaskRunner":
        client = getattr(runner, "_client", None)
        cluster = getattr(runner, "_cluster", None)
        info["scheduler"] = getattr(getattr(client, "scheduler", None), "address", None) or getattr(runner, "address", None)
        if cluster is not None:
            info["cluster"] = type(cluster).__name__
            info["processes"] = bool(runner.cluster_kwargs.get("processes", True))
    elif hasattr(runner, "_max_workers"):
        info["max_workers"] = runner._max_workers
    return info


def configured_flow(flow: Any, cfg: "PipelineConfig") -> Any:
    """`flow` with the task runner from the config (unchanged when the config keeps the default)."""
    runner = task_runner_for(cfg)
    return flow if runner is None else flow.with_options(task_runner=runner)


def summary_markdown(summary: "RunSummary") -> str:
    state = "DEGRADED" if summary.degraded else "ok"
    lines = [f"# {summary.model} {summary.version}: {state}", "", "| stage | status | seconds | message |", "| --- | --- | ---: | --- |"]
    for s in summary.stages:
        msg = s.message.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {s.stage} | {s.status} | {s.seconds:.1f} | {msg} |")
    if summary.links:
        lines += ["", "## Links", ""] + [f"- **{k}**: {v}" for k, v in summary.links.items()]
    lines += ["", f"Run folder: `{summary.run_dir}`  ", f"Manifest: `{summary.manifest}`"]
    return "\n".join(lines)


def publish_summary_markdown(summary: "RunSummary", key: str) -> None:
    """The run summary (stages, links) as a markdown artifact in the Prefect UI; best effort."""
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key=f"summary-{key}", markdown=summary_markdown(summary), description=f"loraship run summary of {summary.model} {summary.version}")
    except Exception as exc:  # pragma: no cover - UI nicety
        log.debug("no markdown artifact: %s", exc)


def cleanup_intermediates(cfg: "PipelineConfig", artifacts: dict[str, "Artifact"]) -> list[str]:
    """Delete what `pipeline.cleanup` asks for, only once what was made from it exists. Returns the paths removed.

    merged/ goes once a GGUF was made from it; the F16 GGUF goes once at least one quantization exists.
    The manifest keeps their records (digests), so provenance stays traceable.
    """
    removed: list[str] = []
    ggufs = [a for a in artifacts.values() if a.kind == "gguf"]
    f16 = [a for a in ggufs if str(a.meta.get("quant", a.name.partition(":")[2])).upper() in ("F16", "BF16", "F32")]
    quants = [a for a in ggufs if a not in f16]
    if cfg.pipeline.cleanup.delete_merged and ggufs:
        for a in (a for a in artifacts.values() if a.kind == "merged"):
            removed += _remove(Path(a.path))
    if cfg.pipeline.cleanup.delete_f16 and quants:
        for a in f16:
            removed += _remove(Path(a.path))
    for p in removed:
        log.info("cleanup: removed %s", p)
    return removed


def _remove(path: Path) -> list[str]:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    else:
        return []
    return [str(path)]
