"""Run logs on disk: `logs/pipeline.log`, one `logs/<stage>.log` per stage and `logs/summary.log`.

Why files, when Prefect keeps every line: a local `python -m flows.full` talks to an ephemeral API that is
gone when the run ends, so yesterday's failure would be unreadable, and a bug report wants a file.

How a record finds its file. Stages run at the same time in threads of the flow's pool (flows/dag.py), and
several flows can run in one process (flows/multi.py), so a logger's name says nothing about which run or
stage wrote a record. Two context variables do: `_RUN` (set by the flow when it opens its logs; Prefect's
thread pools copy the context into the threads they start) and `_STAGE` (set around a stage's runner by
`stage_context`). A record from a thread without them (a library's own thread) falls back on the flow run
id and task name Prefect's loggers attach, else it goes to no run's files.

One handler (`_Router`) is attached to the root logger, where Prefect's loggers and `loraship` propagate
(and to `loraship` loggers a user's logging config made non-propagating); a record reaching it twice is
written once. Prefect's own handlers (console, API: the UI) stay as configured: nothing is removed.

Each file is written through its own descriptor, opened O_APPEND, one `os.write` per record: never through
fd 1 or 2, which llama-cpp-python's `Llama(verbose=False)` points at /dev/null while a model loads
(abetlen/llama-cpp-python#1874), and a crash loses no buffered line. Every line passes through the same
scrubber as notifications (tasks/core/scrub.py) before it is written.

Files are appended per run; each run's part starts with a header line naming the flow run id and the
start time, which is what retention (`logging.retention_days`) reads to drop old runs' parts.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tasks.core.atomic import atomic_write_text
from tasks.core.scrub import scrub
from tasks.core.settings import StrictModel

PIPELINE_LOG = "pipeline.log"
SUMMARY_LOG = "summary.log"
_HEADER = re.compile(r"^===== loraship run (?P<run>\S+) started (?P<at>\S+)(?: .*)?$")
_FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)-7s %(where)s | %(message)s"
_DATEFMT = "%Y-%m-%dT%H:%M:%S"


class LoggingSettings(StrictModel):
    """The `logging` section: how much the project logs, and where run logs are kept (and for how long)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="level of the project's loggers, on the terminal, in the Prefect UI and in the run logs"
    )
    log_dir: str | None = Field(
        None,
        description=(
            "folder of the run logs (pipeline.log, summary.log, <stage>.log); {model} and {version} are replaced; "
            "None: the run folder's logs/"
        ),
    )
    retention_days: int | None = Field(
        None, ge=1, description="at the start of a run, remove the logs of runs that started more days ago; None: keep"
    )


def log_dir_for(settings: LoggingSettings, run_root: Path, model: str, version: str) -> Path:
    """Where a run's logs go: `logging.log_dir` (with {model}/{version} filled in) or `<run folder>/logs`."""
    if not settings.log_dir:
        return Path(run_root) / "logs"
    try:
        text = settings.log_dir.format(model=model, version=version)
    except (KeyError, IndexError, ValueError) as exc:
        from tasks.core.errors import ConfigError

        raise ConfigError(
            f"logging.log_dir {settings.log_dir!r}: only {{model}} and {{version}} can be filled in ({exc})"
        ) from None
    return Path(text).expanduser().resolve()


def _utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


class _Formatter(logging.Formatter):
    """UTC times; Prefect's run records name their task or flow run (as its console does), others their logger."""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        task_run, flow_run = getattr(record, "task_run_name", None), getattr(record, "flow_run_name", None)
        record.where = (
            f"task run {task_run!r}"
            if task_run and record.name.startswith("prefect")
            else f"flow run {flow_run!r}"
            if flow_run and record.name.startswith("prefect")
            else record.name
        )
        return super().format(record)


# --- retention ----------------------------------------------------------------------------------------------


@dataclass
class Retention:
    """What `apply_retention` removed: the runs whose parts were dropped, and the files left empty."""

    runs: set[str] = field(default_factory=set)
    files_removed: list[str] = field(default_factory=list)


def _sections(text: str) -> tuple[str, list[tuple[str, dt.datetime | None, str]]]:
    """A log file as (what precedes the first header, [(run id, start, text of that run's part)])."""
    prefix: list[str] = []
    parts: list[tuple[str, dt.datetime | None, list[str]]] = []
    for line in text.splitlines(keepends=True):
        m = _HEADER.match(line.rstrip("\n"))
        if m:
            try:
                at: dt.datetime | None = dt.datetime.fromisoformat(m["at"])
            except ValueError:
                at = None  # a header we cannot date is never removed
            before = parts[-1][2] if parts else prefix
            lead = [before.pop()] if before and before[-1] == "\n" else []  # the blank line a header starts with
            parts.append((m["run"], at, [*lead, line]))
        elif parts:
            parts[-1][2].append(line)
        else:
            prefix.append(line)
    return "".join(prefix), [(r, at, "".join(lines)) for r, at, lines in parts]


def apply_retention(log_dir: Path, days: int, now: float | None = None, keep_run: str = "") -> Retention:
    """Drop the parts of runs that started more than `days` ago from every `*.log` file in `log_dir`.

    Only what a header of ours starts is removed: lines before the first header, files without headers,
    other files and sub-folders are left alone. A file left with nothing is deleted, any other is rewritten
    atomically. `keep_run` (the current flow run) is never removed."""
    out = Retention()
    if days is None or not log_dir.is_dir():
        return out
    cutoff = dt.datetime.fromtimestamp((time.time() if now is None else now) - days * 86400, dt.UTC)
    for path in sorted(p for p in log_dir.glob("*.log") if p.is_file() and not p.is_symlink()):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        prefix, parts = _sections(text)
        old = [(r, at) for r, at, _ in parts if at is not None and at < cutoff and r != keep_run]
        if not old:
            continue
        kept = prefix + "".join(t for r, at, t in parts if (r, at) not in old)
        out.runs.update(r for r, _ in old)
        if kept.strip():
            atomic_write_text(path, kept)
        else:
            path.unlink()
            out.files_removed.append(path.name)
    return out


# --- writing ------------------------------------------------------------------------------------------------


class _LogFile:
    """One log file of one run: opened on first use, header first, each line written with one os.write."""

    def __init__(self, path: Path, header: str):
        self.path = path
        self._header = header
        self._fd: int | None = None
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        data = (text if text.endswith("\n") else text + "\n").encode("utf-8", "replace")
        with self._lock:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
                if not self._has_header():  # a worker process of this run may have started the part already
                    os.write(fd, self._header.encode())
                self._fd = fd
            os.write(self._fd, data)

    def _has_header(self) -> bool:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - 1_000_000))
                return self._header.strip().encode() in fh.read()
        except OSError:
            return False

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


@dataclass
class _Followed:
    path: Path
    stage: str
    label: str
    offset: int


class RunLogs:
    """The log files of one flow run. Made by `open_run_logs`, closed by `close_run_logs` (a flow hook)."""

    def __init__(
        self, log_dir: Path, flow_run_id: str, model: str, version: str, level: str, started: float | None = None
    ):
        self.dir = Path(log_dir)
        self.flow_run_id = flow_run_id
        self.started = time.time() if started is None else started
        self.level = logging.getLevelName(level) if isinstance(level, str) else int(level)
        self.header = f"\n===== loraship run {flow_run_id} started {_utc(self.started)} ({model} {version}) =====\n"
        self.removed = Retention()
        self.closed = False
        self._files: dict[str, _LogFile] = {}
        self._lock = threading.Lock()
        self._followed: list[_Followed] = []
        self._formatter = _Formatter(_FORMAT, _DATEFMT)

    @property
    def pipeline_log(self) -> Path:
        return self.dir / PIPELINE_LOG

    @property
    def summary_log(self) -> Path:
        return self.dir / SUMMARY_LOG

    def stage_log(self, stage: str) -> Path:
        return self.dir / f"{stage}.log"

    def _file(self, name: str) -> _LogFile:
        with self._lock:
            f = self._files.get(name)
            if f is None:
                f = self._files[name] = _LogFile(self.dir / name, self.header)
            return f

    def emit(self, record: logging.LogRecord, stage: str | None) -> None:
        if self.closed or record.levelno < self.level:
            return
        try:
            text = self._formatter.format(record)
        except Exception:  # pragma: no cover - a record that cannot be formatted is not worth a crash
            return
        if not getattr(record, "loraship_scrubbed", False) or record.stack_info:  # made before the record factory
            text = scrub(text)
        if not getattr(record, "runlog_stage_only", False):
            self._file(PIPELINE_LOG).write(text)
        if stage:
            self._file(f"{stage}.log").write(text)

    def stage_failed(self, stage: str, exc: BaseException) -> None:
        """The error and its traceback in the stage's log (the terminal and the UI have Prefect's report)."""
        record = logging.LogRecord(
            "loraship.runlog",
            logging.ERROR,
            __file__,
            0,
            f"stage {stage} failed",
            None,
            (type(exc), exc, exc.__traceback__),
        )
        self._file(f"{stage}.log").write(scrub(self._formatter.format(record)))

    def write_summary(self, text: str) -> None:
        self._file(SUMMARY_LOG).write(scrub(text))

    def note(self, text: str) -> None:
        """A line of our own in pipeline.log (in the records' format)."""
        record = logging.LogRecord("loraship.runlog", logging.INFO, __file__, 0, text, None, None)
        self._file(PIPELINE_LOG).write(scrub(self._formatter.format(record)))

    def has_file(self, name: str) -> bool:
        return name in self._files

    def follow(self, path: Path, stage: str, label: str) -> None:
        """Copy what a subprocess appends to `path` from now on into the stage's log when the run's logs close
        (a server keeps writing its own file while health and evaluate use it)."""
        path = Path(path)
        offset = path.stat().st_size if path.exists() else 0
        with self._lock:
            self._followed.append(_Followed(path, stage, label, offset))

    def _copy_followed(self) -> None:
        for f in self._followed:
            try:
                with open(f.path, "rb") as fh:
                    fh.seek(f.offset)
                    data = fh.read().decode("utf-8", "replace")
            except OSError:
                continue
            if data.strip():
                body = "".join(f"  {line}\n" for line in data.splitlines())
                self._file(f"{f.stage}.log").write(scrub(f"--- output of {f.label} ({f.path}) in this run ---\n{body}"))

    def close(self) -> None:
        if self.closed:
            return
        self._copy_followed()
        self.closed = True
        with self._lock:
            for f in self._files.values():
                f.close()


# --- routing ------------------------------------------------------------------------------------------------

_RUN: ContextVar[RunLogs | None] = ContextVar("loraship_run_logs", default=None)
_STAGE: ContextVar[str | None] = ContextVar("loraship_stage", default=None)
_BY_FLOW_RUN: dict[str, RunLogs] = {}
_REGISTRY_LOCK = threading.Lock()


def _task_stage(record: logging.LogRecord) -> str | None:
    """The stage a Prefect task-run record belongs to, from the task's name: stage tasks are named after
    their stage (tasks/core/stage.py). The DAG's wrapper task (`stage`) is not: its end-of-run report
    would repeat the traceback `stage_failed` already wrote."""
    from tasks.core.vocab import Stage

    name = str(getattr(record, "task_name", "") or "")
    return name if name in Stage.__members__.values() else None


def _prefect_run_of_thread() -> tuple[str, str | None]:
    """(flow run id, stage) from Prefect's own run context in this thread: a task run on a runner that does
    not carry our context variables still has Prefect's, which its engine restores where the task runs."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:  # pragma: no cover - Prefect is a dependency
        return "", None
    task_ctx = TaskRunContext.get()
    if task_ctx is not None:
        name = str(getattr(task_ctx.task, "name", "") or "")
        from tasks.core.vocab import Stage

        return str(task_ctx.task_run.flow_run_id or ""), name if name in Stage.__members__.values() else None
    flow_ctx = FlowRunContext.get()
    flow_run = getattr(flow_ctx, "flow_run", None) if flow_ctx is not None else None
    return (str(flow_run.id) if flow_run is not None else ""), None


class _Router(logging.Handler):
    """Hands each record to the run logs of the run (and stage) it belongs to.

    In order: our context variables (the flow's thread and the threads Prefect's pools start from it); the
    flow run id a Prefect logger put on the record; Prefect's run context in this thread; else, when this
    process has exactly one run open, that run's pipeline.log (a stage's own helper thread)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _BY_FLOW_RUN or getattr(record, "_loraship_runlog", False):  # no run open; or written already
            return
        record._loraship_runlog = True  # type: ignore[attr-defined]
        try:
            logs, stage = _RUN.get(), _STAGE.get()
            if logs is None or logs.closed:
                flow_run = str(getattr(record, "flow_run_id", "") or "")
                if not flow_run:
                    flow_run, stage = _prefect_run_of_thread()
                logs = _BY_FLOW_RUN.get(flow_run) if flow_run else None
                if logs is None:
                    open_runs = list(_BY_FLOW_RUN.values())
                    logs = open_runs[0] if len(open_runs) == 1 else None
                if logs is None:
                    return
            logs.emit(record, stage or _task_stage(record))
        except Exception:  # a full disk must not break the run: logging reports it once per record, as usual
            self.handleError(record)


_ROUTER = _Router(level=logging.DEBUG)


def _attach_router() -> None:
    """The router on the root logger (Prefect's loggers and `loraship` propagate to it), on `loraship` itself
    and on `loraship` loggers a user's logging config made non-propagating. Checked at every run: a later
    non-incremental `setup_logging` (Prefect's dictConfig) replaces the root logger's handlers."""
    names = {"", "loraship"} | {
        name
        for name, lg in logging.root.manager.loggerDict.items()
        if isinstance(lg, logging.Logger) and not lg.propagate and name.startswith("loraship")
    }
    for name in names:
        lg = logging.getLogger(name)
        if _ROUTER not in lg.handlers:
            lg.addHandler(_ROUTER)


def _current_flow_run_id() -> str:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id or "")
    except Exception:  # pragma: no cover - outside Prefect
        return ""


def open_run_logs(
    settings: LoggingSettings, run_root: Path, model: str, version: str, flow_run_id: str | None = None
) -> RunLogs:
    """Start the current flow run's log files (after retention), and route this context's records to them."""
    run_id = flow_run_id or _current_flow_run_id() or f"local-{uuid.uuid4().hex[:12]}"
    logs = RunLogs(log_dir_for(settings, run_root, model, version), run_id, model, version, settings.level)
    if settings.retention_days:
        logs.removed = apply_retention(logs.dir, settings.retention_days, keep_run=run_id)
    logs.dir.mkdir(parents=True, exist_ok=True)
    with _REGISTRY_LOCK:
        previous = _BY_FLOW_RUN.pop(run_id, None)
        if previous is not None:  # pragma: no cover - a retried flow run opens its logs again
            previous.close()
        _BY_FLOW_RUN[run_id] = logs
        _attach_router()
    _RUN.set(logs)
    logs._file(PIPELINE_LOG).write(f"logs of this run: {logs.dir}")
    if logs.removed.runs:
        logging.getLogger("loraship.runlog").info(
            "logging.retention_days %d: removed the logs of %d older run(s)",
            settings.retention_days,
            len(logs.removed.runs),
        )
    return logs


def current_run_logs() -> RunLogs | None:
    logs = _RUN.get()
    return None if logs is None or logs.closed else logs


def worker_spec() -> dict[str, Any] | None:
    """What a worker process of this run (a Dask worker) needs to write into the same files, or None."""
    logs = current_run_logs()
    if logs is None:
        return None
    return {
        "dir": str(logs.dir),
        "flow_run_id": logs.flow_run_id,
        "header": logs.header,
        "level": logs.level,
        "started": logs.started,
        "host": socket.gethostname(),
    }


_WORKER_RUNS_KEPT = 8


def attach_worker_logs(spec: dict[str, Any] | None) -> bool:
    """In a worker process: records of `spec`'s flow run (found by Prefect's run context there) go to its
    files too. Only on the machine that has them: a remote worker would write a stray folder of its own."""
    if not spec or spec.get("host") != socket.gethostname():
        return False
    import prefect.main  # noqa: F401 - Prefect configures logging on import: attach after it, or it drops us

    logs = RunLogs(Path(spec["dir"]), spec["flow_run_id"], "", "", spec["level"], started=spec["started"])
    logs.header = spec["header"]
    with _REGISTRY_LOCK:
        if spec["flow_run_id"] in _BY_FLOW_RUN:
            return True
        _BY_FLOW_RUN[spec["flow_run_id"]] = logs
        while len(_BY_FLOW_RUN) > _WORKER_RUNS_KEPT:  # a long-lived worker of many runs: the oldest go
            _BY_FLOW_RUN.pop(next(iter(_BY_FLOW_RUN))).close()
        _attach_router()
    return True


def close_run_logs(*_hook_args: Any, flow_run_id: str | None = None) -> None:
    """Close the run's log files. A Prefect flow hook (flow, flow_run, state), like the run folder's lease."""
    run_id = flow_run_id
    if run_id is None and len(_hook_args) >= 2:
        run_id = str(getattr(_hook_args[1], "id", "") or "")
    with _REGISTRY_LOCK:
        logs = _BY_FLOW_RUN.pop(run_id or "", None)
        if logs is None and run_id is None:
            current = _RUN.get()
            logs = _BY_FLOW_RUN.pop(current.flow_run_id, None) if current else None
    if logs is None:
        return
    state = _hook_args[2] if len(_hook_args) >= 3 else None
    if state is not None:  # Prefect logs the final state after the hooks: say it here, the files close now
        ended = f"flow run ended {getattr(state, 'name', state)}: {getattr(state, 'message', '') or ''}".rstrip(": ")
        logs.note(ended)
        if not logs.has_file(SUMMARY_LOG):  # it failed before the end of the flow (no stage table)
            logs.write_summary(f"no stage table: the {ended}")
    logs.close()


RUN_LOG_HOOKS: dict[str, list[Any]] = {
    hook: [close_run_logs] for hook in ("on_completion", "on_failure", "on_crashed", "on_cancellation")
}


@contextlib.contextmanager
def stage_context(stage: str) -> Iterator[None]:
    """Records made inside (in this thread, and in the threads Prefect's pools start from it) belong to `stage`."""
    token = _STAGE.set(str(stage))
    try:
        yield
    finally:
        _STAGE.reset(token)


def stage_failed(stage: str, exc: BaseException) -> Path | None:
    """Write the failed stage's error and traceback to its log; returns the log's path (None: no run logs)."""
    logs = current_run_logs()
    if logs is None:
        return None
    logs.stage_failed(str(stage), exc)
    return logs.stage_log(str(stage))


def follow_output(path: Path, label: str) -> None:
    """A subprocess's own log file (a server's), copied into the current stage's log when the run ends."""
    logs, stage = current_run_logs(), _STAGE.get()
    if logs is not None and stage:
        logs.follow(path, stage, label)
