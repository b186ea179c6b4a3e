"""The registry of deployments: one SQLite database (the standard library's sqlite3) in the loraship home.

Every deployment is a row: name, model, revision, task, port, pid, status, progress, start time, last
error. Several processes write it (deploys, the servers reporting load progress, `stop`), so it runs in
WAL mode with a busy timeout, and the decisions that must not race (is the name free, which port) are
made inside one `BEGIN IMMEDIATE` transaction: concurrent deploys take turns there and never share a
port or a name. The truth about a process is the process itself: `reconcile` marks a row whose server
(or, while starting, whose deploy process) is gone as stopped/failed, so its name and port are free again.
A process is named by pid AND start time (tasks/core/runlock.py), so a recycled pid is never taken for it.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.core.errors import PermanentError, TransientError
from tasks.core.runlock import process_start
from tasks.model_api.settings import loraship_home


class Status(StrEnum):
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


LIVE = (Status.STARTING, Status.READY)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    model TEXT NOT NULL,
    revision TEXT,
    sha TEXT,
    task TEXT,
    host TEXT,
    port INTEGER,
    pid INTEGER,
    pid_start TEXT,
    owner_pid INTEGER,
    owner_start TEXT,
    status TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    step TEXT,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    stopped_at REAL,
    last_error TEXT,
    log_path TEXT,
    device TEXT,
    dtype TEXT,
    request TEXT
);
CREATE INDEX IF NOT EXISTS deployments_name ON deployments(name, started_at);
"""


class Deployment(BaseModel):
    """One row, as the CLI's --json and the Prefect flow hand it out."""

    id: str
    name: str
    model: str
    revision: str | None = None
    sha: str | None = None
    task: str | None = None
    host: str | None = None
    port: int | None = None
    pid: int | None = None
    pid_start: str | None = None
    owner_pid: int | None = None
    owner_start: str | None = None
    status: Status
    progress: float = 0.0
    step: str | None = None
    started_at: float
    updated_at: float
    stopped_at: float | None = None
    last_error: str | None = None
    log_path: str | None = None
    device: str | None = None
    dtype: str | None = None
    request: dict[str, Any] | None = None

    @property
    def url(self) -> str | None:
        if self.port is None:
            return None
        host = "127.0.0.1" if self.host in (None, "0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def public(self) -> dict[str, Any]:
        """What `--json` prints: the row plus its url."""
        return {**self.model_dump(mode="json", exclude={"request", "pid_start", "owner_start"}), "url": self.url}


def _alive(pid: int | None, start: str | None) -> bool:
    """The process pid + start names still runs: a zombie (killed, not yet reaped by its parent) does not."""
    if not pid or start is None or process_start(int(pid)) != start:
        return False
    try:
        import psutil

        if psutil.Process(int(pid)).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            try:
                os.waitpid(int(pid), os.WNOHANG)  # our own child (a test, a flow): reap it
            except ChildProcessError:
                pass
            return False
    except Exception:  # gone between the two looks
        return process_start(int(pid)) == start
    return True


def port_is_free(host: str, port: int) -> bool:
    """Can `port` be bound on `host` now, as uvicorn binds it (SO_REUSEADDR: connections of a stopped server
    in TIME_WAIT do not hold the port; a listening socket does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class DeploymentRegistry:
    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path else loraship_home() / "model_api" / "deployments.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db:
            db.executescript(_SCHEMA)

    @property
    def logs_dir(self) -> Path:
        d = self.path.parent / "logs"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken before reading (BEGIN IMMEDIATE): check-then-write cannot race."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    @staticmethod
    def _row(r: sqlite3.Row) -> Deployment:
        d = dict(r)
        d["request"] = json.loads(d["request"]) if d.get("request") else None
        return Deployment(**d)

    # --- reconcile ------------------------------------------------------------------------------
    def _reconcile(self, db: sqlite3.Connection) -> None:
        now = time.time()
        for r in db.execute("SELECT * FROM deployments WHERE status IN (?, ?)", [s.value for s in LIVE]).fetchall():
            if r["pid"]:
                if _alive(r["pid"], r["pid_start"]):
                    continue
                status = Status.STOPPED if r["status"] == Status.READY else Status.FAILED
                error = r["last_error"] or (None if status == Status.STOPPED else "the server process exited")
            else:
                if _alive(r["owner_pid"], r["owner_start"]):
                    continue
                status, error = Status.FAILED, r["last_error"] or f"the deploy process exited during {r['step']}"
            db.execute(
                "UPDATE deployments SET status=?, last_error=?, stopped_at=?, updated_at=? WHERE id=?",
                [status.value, error, now, now, r["id"]],
            )

    def reconcile(self) -> None:
        """Mark rows whose processes are gone (a killed server: stopped), freeing their names and ports."""
        with self._tx() as db:
            self._reconcile(db)

    # --- create / claim -------------------------------------------------------------------------
    def create(self, name: str, model: str, request: dict[str, Any], owner_pid: int) -> Deployment:
        """A new `starting` row for `name`, refused when a live deployment has that name."""
        now = time.time()
        dep_id = uuid.uuid4().hex[:12]
        with self._tx() as db:
            self._reconcile(db)
            taken = db.execute(
                "SELECT id, status, port FROM deployments WHERE name=? AND status IN (?, ?)",
                [name, *[s.value for s in LIVE]],
            ).fetchone()
            if taken:
                where = f" on port {taken['port']}" if taken["port"] else ""
                raise PermanentError(
                    f"name {name!r} is in use by deployment {taken['id']} ({taken['status']}{where})",
                    hint=f"stop it first (python -m flows.model_api stop {name}) or choose another --name",
                )
            db.execute(
                "INSERT INTO deployments (id, name, model, status, progress, step, started_at, updated_at, owner_pid,"
                " owner_start, revision, device, dtype, host, request) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    dep_id,
                    name,
                    model,
                    Status.STARTING.value,
                    0.0,
                    "validate",
                    now,
                    now,
                    owner_pid,
                    process_start(owner_pid),
                    request.get("revision"),
                    str(request.get("device")),
                    str(request.get("dtype")),
                    request.get("host"),
                    json.dumps(request, default=str),
                ],
            )
        return self.get_id(dep_id)

    def claim_port(self, dep_id: str, host: str, port_range: tuple[int, int], fixed: int | None = None) -> int:
        """Give the deployment a port no live deployment holds and that binds now, atomically."""
        with self._tx() as db:
            self._reconcile(db)
            held = {
                int(r["port"])
                for r in db.execute(
                    "SELECT port FROM deployments WHERE port IS NOT NULL AND id != ? AND status IN (?, ?)",
                    [dep_id, *[s.value for s in LIVE]],
                )
            }
            candidates = [fixed] if fixed else list(range(port_range[0], port_range[1] + 1))
            for port in candidates:
                if port not in held and port_is_free(host, port):
                    db.execute("UPDATE deployments SET port=?, updated_at=? WHERE id=?", [port, time.time(), dep_id])
                    return port
        if fixed:
            raise PermanentError(f"port {fixed} is in use", hint="choose another --port, or leave it out for the pool")
        raise TransientError(
            f"no free port in {port_range[0]}-{port_range[1]}",
            hint="stop a deployment (python -m flows.model_api stop)",
        )

    # --- updates --------------------------------------------------------------------------------
    def update(self, dep_id: str, **fields: Any) -> None:
        if not fields:
            return
        fields["updated_at"] = time.time()
        for k in ("status",):
            if k in fields and fields[k] is not None:
                fields[k] = str(fields[k])
        cols = ", ".join(f"{k}=?" for k in fields)
        with self._tx() as db:
            db.execute(f"UPDATE deployments SET {cols} WHERE id=?", [*fields.values(), dep_id])

    def progress(self, dep_id: str, percent: float, step: str) -> None:
        self.update(dep_id, progress=round(float(percent), 1), step=step)

    def set_server(self, dep_id: str, pid: int, log_path: Path) -> None:
        self.update(dep_id, pid=pid, pid_start=process_start(pid), log_path=str(log_path))

    # --- reads ----------------------------------------------------------------------------------
    def get_id(self, dep_id: str) -> Deployment:
        with closing(self._connect()) as db:
            r = db.execute("SELECT * FROM deployments WHERE id=?", [dep_id]).fetchone()
        if r is None:
            raise PermanentError(f"no deployment with id {dep_id}")
        return self._row(r)

    def latest(self, name: str, reconcile: bool = True) -> Deployment:
        """The most recent deployment called `name` (a live one first)."""
        if reconcile:
            self.reconcile()
        with closing(self._connect()) as db:
            r = db.execute(
                "SELECT * FROM deployments WHERE name=? ORDER BY status IN ('starting','ready') DESC, started_at DESC",
                [name],
            ).fetchone()
        if r is None:
            raise PermanentError(f"no deployment named {name!r}", hint="see python -m flows.model_api list")
        return self._row(r)

    def list(self, all_rows: bool = False) -> list[Deployment]:
        """Live deployments (reconciled first); `all_rows`: also the stopped and failed ones."""
        self.reconcile()
        with closing(self._connect()) as db:
            if all_rows:
                rows = db.execute("SELECT * FROM deployments ORDER BY started_at").fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM deployments WHERE status IN (?, ?) ORDER BY started_at", [s.value for s in LIVE]
                ).fetchall()
        return [self._row(r) for r in rows]
