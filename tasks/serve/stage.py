"""Stage 9, serve: an OpenAI-compatible server for chosen GGUFs, each on a free port from a pool.

Each model runs in its own child process (`python -m tasks.serve.app`, llama-cpp-python's server app
plus /health, /info, /predict) on the first free port of `serving.port_range`; several models run at
once on separate ports. The stage returns one `serve:<QUANT>` record per server (kind `service`) whose
file (reports/serve-<QUANT>.json) holds PID, port, base URL, model file and log file. The flow stops
the servers at its end (SIGTERM: uvicorn finishes open requests; SIGKILL after a grace period) unless
`serving.keep_running`; `python -m tasks.serve stop <record.json|pid>` stops a kept one later.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

import requests
from pydantic import Field, field_validator, model_validator

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_write_json
from tasks.core.constants import PROJECT_ROOT
from tasks.core.errors import PermanentError, TransientError
from tasks.core.runlock import process_start
from tasks.core.runlog import follow_output
from tasks.core.settings import StrictModel
from tasks.core.stage import stage_task
from tasks.core.vocab import ArtifactKind, Stage
from tasks.gguf import quant_types

STAGE = Stage.SERVE
log = logging.getLogger("loraship.serve")


class ServeSettings(StrictModel):
    """Which GGUFs (or, with the transformers engine, the merged model) to serve and where."""

    engine: str = Field(
        "llama_cpp",
        description="serve engine (tasks/serve/engines): llama_cpp (the GGUFs), transformers (merged/, model API)",
    )
    transformers_name: str | None = Field(
        None, description="transformers engine: the deployment's name (default <model>-<version>)"
    )
    quant: str = Field(default_factory=quant_types.default_quant, description="the quant to serve (health checks it)")
    extra_quants: list[str] = Field(
        default_factory=list, description="more quants served at the same time, each on its own port"
    )
    host: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0 to serve the network)")
    port_range: tuple[int, int] = Field((8100, 8200), description="ports tried in order; the first free one is used")
    keep_running: bool = Field(
        False,
        description="leave the servers running when the flow ends (stop: python -m tasks.serve stop <record>)",
    )
    n_ctx: int = Field(2048, ge=16, description="context length of the served model")
    threads: int | None = Field(None, ge=1, description="inference threads (None: llama.cpp's default)")
    start_timeout_s: float = Field(180.0, gt=0, description="how long to wait for a server to answer /health")
    stop_timeout_s: float = Field(15.0, gt=0, description="grace period after SIGTERM before SIGKILL")

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        from tasks.serve.engines import SERVE_ENGINES  # the engines import this module

        return SERVE_ENGINES.check(v)

    @field_validator("quant")
    @classmethod
    def _known_quant(cls, v: str) -> str:
        return quant_types.check_quant(v)

    @field_validator("extra_quants")
    @classmethod
    def _known_quants(cls, v: list[str]) -> list[str]:
        return quant_types.check_quants(v) or []

    @model_validator(mode="after")
    def _ports(self) -> ServeSettings:
        lo, hi = self.port_range
        if not (1 <= lo <= hi <= 65535):
            raise ValueError("serving.port_range must be [low, high] with 1 <= low <= high <= 65535")
        return self


# Child processes started by this process (pid -> Popen), so they are reaped when stopped.
_CHILDREN: dict[int, subprocess.Popen] = {}
_KEEP: set[int] = set()
_claimed: set[int] = set()
_lock = threading.Lock()


def _stop_leftovers() -> None:
    """At interpreter exit, stop servers nobody stopped (a failed run) unless they are to be kept."""
    for pid in list(_CHILDREN):
        if pid not in _KEEP:
            try:
                stop_pid(pid, 5.0)
            except Exception:  # exiting anyway
                pass


atexit.register(_stop_leftovers)


def keep(pids: list[int]) -> None:
    """Leave these servers running when this process exits (serving.keep_running)."""
    _KEEP.update(pids)


def free_port(host: str, port_range: tuple[int, int]) -> int:
    """The first port in the pool that can be bound now and was not handed out by this process."""
    lo, hi = port_range
    with _lock:
        for port in range(lo, hi + 1):
            if port in _claimed:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _claimed.add(port)
            return port
    raise TransientError(
        f"no free port in serving.port_range {lo}-{hi}", hint="stop other servers or widen serving.port_range"
    )


def start_server(gguf: Artifact, settings: ServeSettings, state_dir: Path, alias: str | None = None) -> dict[str, Any]:
    """Start one server for `gguf`, wait until /health answers, and return its record (pid, port, url...)."""
    if not gguf.local_path.is_file():
        raise PermanentError(f"GGUF {gguf.path} does not exist", hint="run the quantize stage (or --from quantize)")
    quant = str(gguf.meta.get("quant") or gguf.local_path.stem)
    alias = alias or gguf.local_path.name.removesuffix(".gguf")
    state_dir.mkdir(parents=True, exist_ok=True)
    info_path = atomic_write_json(
        state_dir / f"serve-{quant}.info.json",
        {"quant": quant, "size": gguf.size, "sha256": gguf.sha256, "artifact": gguf.name},
    )
    log_path = state_dir / f"serve-{quant}.log"
    follow_output(log_path, f"the server of {alias}")  # what it prints in this run goes to logs/serve.log too
    attempts = 3
    for attempt in range(attempts):
        port = free_port(settings.host, settings.port_range)
        cmd = [sys.executable, "-m", "tasks.serve.app", "--model", str(gguf.local_path), "--alias", alias]
        cmd += ["--host", settings.host, "--port", str(port), "--n-ctx", str(settings.n_ctx)]
        cmd += ["--info-json", str(info_path), *(["--threads", str(settings.threads)] if settings.threads else [])]
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                cmd,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=str(PROJECT_ROOT),
            )
        _CHILDREN[proc.pid] = proc
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        base = f"http://{host}:{port}"
        ready_s = _wait_ready(proc, base, settings.start_timeout_s)
        if ready_s is not None:
            record = {
                "pid": proc.pid,
                # pid + start time name this very process (a restart of the flow finds it again,
                # tasks/core/runlock.py stops it when the run that started it was killed)
                "process_start": process_start(proc.pid),
                "owner_pid": os.getpid(),
                "keep": settings.keep_running,
                "port": port,
                "host": settings.host,
                "base_url": f"{base}/v1",
                "url": base,
                "model_id": alias,
                "quant": quant,
                "gguf": str(gguf.local_path),
                "sha256": gguf.sha256,
                "log": str(log_path),
                "started_at": time.time(),
                "ready_s": ready_s,
            }
            log.info("serving %s on %s (pid %d, ready in %.1fs)", alias, base, proc.pid, ready_s)
            return record
        tail = log_path.read_text(errors="replace")[-1500:] if log_path.exists() else ""
        stop_pid(proc.pid, 5)
        if "address already in use" in tail.lower() and attempt + 1 < attempts:
            log.info("port %d was taken meanwhile; trying another", port)
            continue
        _raise_not_started(proc, gguf, settings, log_path, tail)
    raise TransientError("could not bind a port from serving.port_range")  # pragma: no cover


def _wait_ready(proc: subprocess.Popen, base: str, timeout_s: float) -> float | None:
    """Seconds until `proc` itself answers /health at `base` (the pid in the answer: not another process that
    took the port meanwhile), or None when it exits or the time runs out."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            return None
        try:
            with requests.Session() as http:  # closed by us: the TIME_WAIT stays on our side, not the server's port
                r = http.get(f"{base}/health", timeout=2)
                if r.status_code == 200 and r.json().get("pid", proc.pid) == proc.pid:
                    return round(time.monotonic() - started, 2)
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.25)
    return None


def _raise_not_started(
    proc: subprocess.Popen, gguf: Artifact, settings: ServeSettings, log_path: Path, tail: str
) -> NoReturn:
    """A server that never answered is transient (slow load: retried); one that exited on its own is not."""
    if proc.returncode is None or proc.returncode in (-signal.SIGTERM, -signal.SIGKILL):
        raise TransientError(
            (
                f"the server for {gguf.local_path.name} did not answer /health within "
                f"{settings.start_timeout_s:.0f}s (log: {log_path})"
            ),
            hint="raise serving.start_timeout_s for big models",
        )
    raise PermanentError(
        f"the server for {gguf.local_path.name} exited with code {proc.returncode}: {tail[-600:]}",
        hint=f"see {log_path}",
    )


def stop_pid(pid: int, timeout: float = 15.0) -> str:
    """SIGTERM the server (uvicorn drains requests), SIGKILL after `timeout`. Returns how it ended."""
    proc = _CHILDREN.pop(pid, None)
    if proc is not None:
        if proc.poll() is not None:
            return "already exited"
        proc.terminate()
        try:
            proc.wait(timeout)
            return "stopped"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            return "killed"
    import psutil

    try:
        p = psutil.Process(pid)
        cmdline = " ".join(p.cmdline())
    except psutil.NoSuchProcess:
        return "already exited"
    if "tasks.serve.app" not in cmdline:
        raise PermanentError(
            f"pid {pid} is not a loraship server ({cmdline[:80]})",
            hint="pass the serve-<QUANT>.json record or the right pid",
        )
    p.terminate()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # not our child: poll (a zombie has exited, its parent reaps it)
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                return "stopped"
        except psutil.NoSuchProcess:
            return "stopped"
        time.sleep(0.1)
    p.kill()
    return "killed"


def stop_servers(records: list[dict[str, Any]] | list[Artifact], timeout: float = 15.0) -> dict[int, str]:
    out = {}
    for r in records:
        pid = int(r.meta["pid"] if isinstance(r, Artifact) else r["pid"])
        out[pid] = stop_pid(pid, timeout)
        port = int(r.meta["port"] if isinstance(r, Artifact) else r["port"])
        with _lock:
            _claimed.discard(port)
    return out


def serve(ggufs: list[Artifact], settings: ServeSettings, state_dir: Path) -> list[Artifact]:
    """Start a server for `serving.quant` and each of `serving.extra_quants`; one `serve:<QUANT>` record each."""
    by_quant = {a.meta.get("quant"): a for a in ggufs}
    wanted = [settings.quant, *[q for q in settings.extra_quants if q != settings.quant]]
    missing = [q for q in wanted if q not in by_quant]
    if missing:
        raise PermanentError(
            (
                f"serving.quant/extra_quants name {missing}, not made in this run (made: "
                f"{', '.join(str(q) for q in by_quant)})"
            ),
            hint="pick quants listed in quantization.types, or F16",
        )
    out: list[Artifact] = []
    started: list[dict[str, Any]] = []
    try:
        for q in wanted:
            rec = start_server(by_quant[q], settings, state_dir)
            started.append(rec)
            path = atomic_write_json(state_dir / f"serve-{q}.json", rec)
            out.append(
                Artifact.from_path(
                    path,
                    name=f"serve:{q}",
                    kind=ArtifactKind.SERVICE,
                    stage=STAGE,
                    inputs=[by_quant[q]],
                    settings=settings,
                    meta={k: rec[k] for k in ("pid", "port", "base_url", "url", "model_id", "quant", "log")},
                )
            )
    except BaseException:
        stop_servers(started, settings.stop_timeout_s)
        raise
    return out


@stage_task(STAGE, cache=False)
def serve_task(inputs: list[Artifact], settings: ServeSettings, state_dir: Path) -> list[Artifact]:
    """The configured engine's servers for `inputs` (GGUFs for llama_cpp, merged/ for transformers)."""
    from tasks.serve.engines import SERVE_ENGINES

    return SERVE_ENGINES.lookup(settings.engine).start(inputs, settings, state_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tasks.serve",
        description="Stop a server the serve stage left running (serving.keep_running).",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("stop", help="stop a server: its reports/serve-<QUANT>.json record, or its pid")
    sp.add_argument("target")
    sp.add_argument("--timeout", type=float, default=15.0)
    args = p.parse_args(argv)
    target = Path(args.target)
    pid = int(json.loads(target.read_text())["pid"]) if target.is_file() else int(args.target)
    try:
        print(f"{pid}: {stop_pid(pid, args.timeout)}")
    except PermanentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
