"""Test helpers: a real `prefect server start` on loopback (SQLite, basic auth) and a local HTTP receiver.

The server runs as a child process with its own PREFECT_HOME; clients in the test process reach it
through `client_env()` (environment for child processes) and `use_server()` (settings for this one).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.ports import free_port

AUTH = "loraship-ci:not-a-real-password-7f3a"


@dataclass
class PrefectServer:
    api_url: str
    auth: str
    home: Path
    proc: subprocess.Popen
    log: Path

    def client_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "PREFECT_API_URL": self.api_url,
                "PREFECT_API_AUTH_STRING": self.auth,
                "PREFECT_HOME": str(self.home / "client"),
                "DO_NOT_TRACK": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_CLI_PROMPT": "false",
            }
        )
        env.pop("PREFECT_SERVER_API_AUTH_STRING", None)
        env.update(extra)
        return env

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        """Point this process's Prefect client at the server (settings + environment) for the block."""
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        old = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")}
        os.environ["PREFECT_API_URL"] = self.api_url
        os.environ["PREFECT_API_AUTH_STRING"] = self.auth
        try:
            with temporary_settings(updates={PREFECT_API_URL: self.api_url, PREFECT_API_AUTH_STRING: self.auth}):
                yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def start_server(home: Path, timeout: float = 180.0) -> PrefectServer:
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(home / "server"),
            "PREFECT_SERVER_API_AUTH_STRING": AUTH,
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # Let the server talk to itself (its services use the client settings).
            "PREFECT_API_AUTH_STRING": AUTH,
        }
    )
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                if r.status == 200:
                    return PrefectServer(api_url=api, auth=AUTH, home=home, proc=proc, log=log)
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"prefect server did not answer in {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop a child started in its own session (the server or a worker) and everything it started."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@dataclass
class Receiver:
    """A local HTTP endpoint that records every request (a stand-in for Slack/a webhook consumer)."""

    url: str
    requests: list[dict] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None

    def wait_for(self, count: int, timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return list(self.requests)


@contextlib.contextmanager
def receiver() -> Iterator[Receiver]:
    rec = Receiver(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server API
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                data = json.loads(body)
            except ValueError:
                data = body.decode(errors="replace")
            rec.requests.append({"path": self.path, "headers": dict(self.headers), "json": data})
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.server = srv
    rec.url = f"http://127.0.0.1:{srv.server_address[1]}/hook"
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield rec
    finally:
        srv.shutdown()
        srv.server_close()


@contextlib.contextmanager
def serving(home: Path) -> Iterator[PrefectServer]:
    """A `prefect server start` used by this process for the block, stopped after buffered logs and
    events were sent (else they fail noisily at exit). For module-scoped fixtures."""
    srv = start_server(home)
    try:
        with srv.use():
            yield srv
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)
    finally:
        stop(srv.proc)


def settled_task_runs(
    flow_run_id: Any, names: Collection[str] = (), ids: Collection[str] = (), timeout: float = 60.0
) -> list[Any]:
    """The flow run's task runs, read once every one named in `names` (or with an id in `ids`) is final.

    Why poll: a Prefect 3 client reports task-run states as events, and the server records them on its own
    time, so a flow can return before its last task run reached the database (seen on a loaded CI machine:
    the last stage, card, was missing from a read made right after the flow). A run counts once its state is
    final and its end time is set, since tests read the spans and the `wait_for` inputs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            final = [r for r in runs if r.state is not None and r.state.is_final() and r.end_time is not None]
            missing = (set(names) - {r.name for r in final}) | (set(ids) - {str(r.id) for r in final})
            if not missing:
                return runs
            if time.monotonic() > deadline:
                raise AssertionError(f"task runs not on the server after {timeout:.0f}s: {sorted(missing)}")
            time.sleep(0.2)
