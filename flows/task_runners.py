"""The task runner of a run: Prefect's thread pool by default, Dask when the config asks for it.

Which runner ran a fan-out is recorded per stage (`describe_task_runner`), and Dask workers get the
project's log levels before the first item (`prepare_task_runner`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from tasks.core.errors import PermanentError

if TYPE_CHECKING:
    from flows.config import PipelineConfig

log = logging.getLogger("loraship.orchestration")


def task_runner_for(cfg: PipelineConfig) -> Any | None:
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
            hint=(
                "pip install dask distributed && pip install --no-deps prefect-dask (its own pins would replace "
                "prefect), or set performance.task_runner: thread"
            ),
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
                "process starts its own temporary API, which is slow; run `prefect server start` and export "
                "PREFECT_API_URL"
            )
    else:
        kwargs["n_workers"] = 1  # threads of this process (llama.cpp releases the GIL), like the default runner
        if perf.parallelism:
            kwargs["threads_per_worker"] = perf.parallelism
    return DaskTaskRunner(cluster_kwargs=kwargs)


def prepare_task_runner(runner: Any, level: str) -> None:
    """Before a fan-out: Dask workers (other processes, maybe other machines) get the same log levels."""
    if type(runner).__name__ != "DaskTaskRunner":
        return
    from distributed.diagnostics.plugin import WorkerPlugin

    from tasks.core.runlog import worker_spec

    class LoraShipLogging(WorkerPlugin):
        """Sets the project's log level in each worker; llama.cpp's per-tensor lines only when debugging
        (llama-cpp-python 0.3.36 maps ggml's INFO to WARNING, so its own WARNING threshold lets them through).
        Workers on this machine also write the run's log files (tasks/core/runlog.py)."""

        name = "loraship-logging"

        def __init__(self, level: str, run_logs: dict[str, Any] | None) -> None:
            self.level = level
            self.run_logs = run_logs

        def setup(self, worker: Any) -> None:
            import logging as _logging

            from tasks.core.runlog import attach_worker_logs

            _logging.getLogger("loraship").setLevel(self.level)
            _logging.getLogger("llama-cpp-python").setLevel(_logging.DEBUG if self.level == "DEBUG" else _logging.ERROR)
            attach_worker_logs(self.run_logs)

    runner.client.register_plugin(LoraShipLogging(level, worker_spec()), name="loraship-logging")


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value() or "")


def describe_task_runner(runner: Any) -> dict[str, Any]:
    """What ran a fan-out, for the run record: runner type, and for Dask the scheduler and cluster kind."""
    info: dict[str, Any] = {"runner": type(runner).__name__}
    if info["runner"] == "DaskTaskRunner":
        client = getattr(runner, "_client", None)
        cluster = getattr(runner, "_cluster", None)
        info["scheduler"] = getattr(getattr(client, "scheduler", None), "address", None) or getattr(
            runner, "address", None
        )
        if cluster is not None:
            info["cluster"] = type(cluster).__name__
            info["processes"] = bool(runner.cluster_kwargs.get("processes", True))
    elif hasattr(runner, "_max_workers"):
        info["max_workers"] = runner._max_workers
    return info


def configured_flow(flow: Any, cfg: PipelineConfig) -> Any:
    """`flow` with the task runner from the config (unchanged when the config keeps the default)."""
    runner = task_runner_for(cfg)
    return flow if runner is None else flow.with_options(task_runner=runner)
