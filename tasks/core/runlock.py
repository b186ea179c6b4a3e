"""One run per run folder: an exclusive lock held for the whole flow, and recovery from a killed run.

Two flow runs on one model and version (two `training.completed` events, the nightly health run during
a full run) would race on adapter/, merged/, gguf/ and the manifest. So the flow claims the folder
first: `.run.lock` is locked with flock(2) for as long as the flow runs, and holds who has it (flow run
id, host, pid, since when) for the error a second run gets at once. The kernel drops a flock when its
process dies, however it dies: a lock left by a killed run is simply free, and its holder record, still
in the file, is reported in a warning when the next run takes over. The file is never deleted (deleting
a lock file lets two processes lock two different files of the same name).

Under the lock, `recover_run_folder` clears what a killed run left: `.partial-*` files and folders
(half-written GGUFs, merged folders, the old side of an exchange) are removed, except the download's
resumable transfer folders (`.partial-rsync`, `.partial-sftp`: the next download continues from them),
and servers the serve stage recorded (reports/serve-*.json) that are still running although the run that
started them is gone are stopped, unless they were kept on purpose (`serving.keep_running`). A recorded
process is identified by pid AND start time, so a pid the system has since given to another process is
never touched.

The flow calls `open_run_folder` once after it knows the run folder and passes `release_run_folder` to
Prefect as its completion, failure, crash and cancellation hook (`RUN_FOLDER_HOOKS`).
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.atomic import TMP_MARKER
from tasks.core.errors import PermanentError

log = logging.getLogger("loraship.run")

LOCK_FILE = ".run.lock"
RESUMABLE = frozenset({".partial-rsync", ".partial-sftp"})  # the download resumes from these


class RunFolderBusy(PermanentError):
    """Another run holds the run folder."""

    def __init__(self, message: str, hint: str | None = None, holder: dict[str, Any] | None = None):
        super().__init__(message, hint)
        self.holder = holder or {}


@dataclass
class RunLease:
    """A held run-folder lock; `release()` (or the process ending) frees it."""

    root: Path
    holder: dict[str, Any]
    fd: int | None
    previous: dict[str, Any] = field(default_factory=dict)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # a clean release leaves no holder to warn about
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 1 << 16)
        doc = json.loads(data.decode("utf-8")) if data.strip() else {}
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def describe(holder: dict[str, Any]) -> str:
    return (
        f"flow run {holder.get('flow_run_id') or '(no flow run)'} (pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, since {holder.get('since', '?')})"
    )


def _pid_alive_here(holder: dict[str, Any]) -> bool:
    """For filesystems without flock: is the recorded holder a live process on this host?"""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return bool(holder)  # another host's lock cannot be checked from here: respect it
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_run_folder(root: Path | str, flow_run_id: str | None = None) -> RunLease:
    """Lock the run folder `root` for this process, or fail at once naming the run that holds it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        flocked = True
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunFolderBusy(
            f"run folder {root} is in use by {describe(holder)}",
            hint=(
                "one run per model and version at a time: wait for that run to end (or stop it), or give this "
                "run another model.version"
            ),
            holder=holder,
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise
        flocked = False  # a filesystem without flock (some network mounts): fall back to the holder's pid
    previous = _read_holder(fd)
    if previous and not flocked and _pid_alive_here(previous):
        os.close(fd)
        raise RunFolderBusy(f"run folder {root} is in use by {describe(previous)}", holder=previous)
    if previous:
        log.warning(
            "run folder %s: taking over the lock left by %s, which is gone (killed or crashed)",
            root,
            describe(previous),
        )
    holder = {
        "flow_run_id": flow_run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode())
    os.fsync(fd)
    return RunLease(root=root, holder=holder, fd=fd, previous=previous)


# --- recovery from a killed run ---------------------------------------------------------------------


@dataclass
class Recovery:
    removed: list[str] = field(default_factory=list)  # partial files and folders deleted
    stopped: list[int] = field(default_factory=list)  # pids of orphaned servers stopped


def remove_partials_under(root: Path) -> list[str]:
    """Delete every `.partial-*` file or folder below `root` (not following links), except the download's
    resumable transfer folders."""
    removed: list[str] = []
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            if not name.startswith(TMP_MARKER) or name in RESUMABLE:
                continue
            p = Path(dirpath) / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(str(p))
        dirs[:] = [d for d in dirs if not d.startswith(TMP_MARKER)]
    return removed


def process_start(pid: int) -> str | None:
    """An identity for the process `pid` that a later process with the same pid cannot have: its start
    time in clock ticks since boot on Linux (/proc/<pid>/stat; immune to wall-clock changes), else
    psutil's create time. None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return f"ticks:{int(fields[19])}"  # field 22 of proc(5); fields[0] is field 3
    except (OSError, IndexError, ValueError):
        pass
    import psutil

    try:
        return f"time:{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return None


def _same_process(record: dict[str, Any]) -> Any:
    """The psutil.Process the record names, if that very process (pid and start) still runs."""
    import psutil

    try:
        pid = int(record["pid"])
        if not record.get("process_start") or process_start(pid) != record["process_start"]:
            return None
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except (KeyError, TypeError, ValueError, psutil.Error):
        return None


def stop_orphaned_servers(reports_dir: Path, timeout: float = 10.0) -> list[int]:
    """Stop servers recorded in `reports_dir/serve-*.json` whose run is gone (not kept on purpose)."""
    import psutil

    stopped: list[int] = []
    for path in sorted(reports_dir.glob("serve-*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or "pid" not in record or record.get("keep"):
            continue
        if record.get("owner_pid") == os.getpid():
            continue  # this process's own server (a second flow of one process): its run stops it
        proc = _same_process(record)
        if proc is None:
            continue
        log.warning(
            "stopping server pid %s (port %s) left running by a killed run of this folder (%s)",
            proc.pid,
            record.get("port"),
            path.name,
        )
        proc.terminate()
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        stopped.append(proc.pid)
    return stopped


def recover_run_folder(run: Any) -> Recovery:
    """Clear what an earlier, killed run of this folder left (call it with the lock held)."""
    report = Recovery(removed=remove_partials_under(run.root), stopped=stop_orphaned_servers(run.reports_dir))
    if report.removed:
        log.warning(
            "run folder %s: removed %d partial file(s)/folder(s) a killed run left: %s",
            run.root,
            len(report.removed),
            ", ".join(Path(p).name for p in report.removed[:5]),
        )
    return report


# --- the flow's side: claim at the start, release from Prefect's state hooks ------------------------

_LEASES: dict[str, list[RunLease]] = {}
_LEASES_LOCK = threading.Lock()


def _current_flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # pragma: no cover - outside Prefect
        return None


def open_run_folder(run: Any) -> Recovery:
    """Claim `run`'s folder for the current flow run and recover it from a killed run.

    The lease is released by `release_run_folder` (Prefect's hooks, `RUN_FOLDER_HOOKS`) when the flow run
    ends, whatever way; if the process dies, the kernel releases it.
    """
    run_id = _current_flow_run_id()
    lease = claim_run_folder(run.root, flow_run_id=run_id)
    with _LEASES_LOCK:
        _LEASES.setdefault(run_id or "", []).append(lease)
    try:
        return recover_run_folder(run)
    except BaseException:
        release_run_folder(flow_run_id=run_id)
        raise


def release_run_folder(*_hook_args: Any, flow_run_id: str | None = None) -> None:
    """Release the run folders the flow run holds (a Prefect flow state hook: `(flow, flow_run, state)`)."""
    run_id = flow_run_id
    if run_id is None and len(_hook_args) >= 2:
        run_id = str(getattr(_hook_args[1], "id", "") or "")
    with _LEASES_LOCK:
        leases = _LEASES.pop(run_id or "", [])
    for lease in leases:
        lease.release()


RUN_FOLDER_HOOKS: dict[str, list[Any]] = {
    hook: [release_run_folder] for hook in ("on_completion", "on_failure", "on_crashed", "on_cancellation")
}
