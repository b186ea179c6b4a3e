"""A deployment in six steps, with progress 0-100 in the registry, on the terminal and in the Prefect UI.

1. Validate (0-10%): the request is a valid `DeployRequest`, the model exists as a folder or a Hub id,
   and the name is free among live deployments (the registry refuses a second one atomically).
2. Download (10-55%): the snapshot into the shared cache, counted in bytes, within download_timeout_s;
   the task is inferred from the files when not given.
3. Load (55-60%) and 4. Pipeline (60-75%) run in the server process, which reports them itself.
5. Server (75-85%): the port is claimed from the pool before the server starts (atomically, so two
   deploys never share one), because the server binds it at once to answer /health with the progress
   while it loads; 85% is the server saying it can serve.
6. Ready (85-100%): the server's own example request is sent to /predict and answered.

`deploy` returns the ready `Deployment`; a failure marks the row failed with the error, stops the
server it started, and raises a PermanentError/TransientError that says what to change.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from tasks.core.atomic import atomic_write_json
from tasks.core.constants import PROJECT_ROOT
from tasks.core.errors import PermanentError, PipelineError, TransientError
from tasks.core.progress import Progress
from tasks.core.runlock import process_start
from tasks.model_api.download import fetch, readme_pipeline_tag, resolve_source
from tasks.model_api.registry import LIVE, Deployment, DeploymentRegistry, Status
from tasks.model_api.settings import DeployRequest, ServerSpec
from tasks.model_api.tasks_table import infer_task

log = logging.getLogger("loraship.model_api")
_CHILDREN: dict[int, subprocess.Popen] = {}


class _Reporter:
    """One place progress goes: the registry row, the terminal bar (and Prefect artifact) of `Progress`."""

    def __init__(self, registry: DeploymentRegistry, dep_id: str, name: str):
        self.registry, self.dep_id = registry, dep_id
        self.bar = Progress(f"deploy {name}", 100, unit="%")
        self.percent = 0.0

    def __call__(self, percent: float, step: str) -> None:
        if percent < self.percent:
            return
        self.percent = percent
        self.registry.progress(self.dep_id, percent, step)
        self.bar.update_to(percent)

    def follow(self, row: Deployment) -> None:
        """The server writes steps 3-5 into the registry itself; mirror them on the bar."""
        if row.progress > self.percent:
            self.percent = row.progress
            self.bar.update_to(row.progress)


def _config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PermanentError(f"model: {path}/config.json cannot be read ({exc})")


def _spawn(spec: ServerSpec, spec_path: Path, log_path: Path) -> subprocess.Popen:
    atomic_write_json(spec_path, spec.model_dump(mode="json"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    # OpenMP workers that sleep instead of spinning between ops: one batcher thread drives torch, and spinning
    # workers on a busy machine took the cores from it (a 32-input batch: 163 ms spinning, 30 ms passive).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.model_api.server", str(spec_path)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the deploy command (and a Ctrl-C in its terminal)
            cwd=str(PROJECT_ROOT),
            env=env,
        )
    _CHILDREN[proc.pid] = proc
    return proc


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _wait_serving(
    proc: subprocess.Popen, url: str, deadline: float, registry: DeploymentRegistry, dep_id: str, rep: _Reporter
) -> str | None:
    """Poll /health until 200. None when serving; "port" when the port was taken meanwhile; raises otherwise."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            row = registry.get_id(dep_id)
            tail = _tail(Path(row.log_path or ""))
            if "address already in use" in tail.lower():
                return "port"
            raise PermanentError(
                f"the server exited with code {proc.returncode}: {row.last_error or tail[-600:]}",
                hint=f"see {row.log_path}",
            )
        try:
            r = requests.get(f"{url}/health", timeout=2)
            if r.headers.get("content-type", "").startswith("application/json"):
                body = r.json()
                if body.get("deployment_id") not in (None, dep_id):  # another server took the port first
                    _terminate(proc.pid, process_start(proc.pid), 10.0)
                    return "port"
                if r.status_code == 200 and body.get("deployment_id") == dep_id:
                    return None
                if body.get("deployment_id") is None and r.status_code == 200:  # not one of ours at all
                    _terminate(proc.pid, process_start(proc.pid), 10.0)
                    return "port"
        except (requests.RequestException, ValueError):
            pass
        rep.follow(registry.get_id(dep_id))
        time.sleep(0.2)
    raise TransientError(
        f"the server did not become ready within start_timeout_s ({url})", hint="raise start_timeout_s for big models"
    )


def _ready_check(url: str, timeout: float) -> dict[str, Any]:
    """Step 6: the server's own example request must be answered with status ok."""
    example = requests.get(f"{url}/info", timeout=10).json().get("example")
    r = requests.post(f"{url}/predict", json=example, timeout=timeout)
    if r.status_code != 200 or r.json().get("status") != "ok":
        raise PermanentError(f"the first request to {url}/predict failed ({r.status_code}): {r.text[:500]}")
    return r.json()


def deploy(req: DeployRequest, registry: DeploymentRegistry | None = None) -> Deployment:
    """Run the six steps; the server keeps running after this returns (stop it with `stop`)."""
    registry = registry or DeploymentRegistry()
    source = resolve_source(req.model)  # step 1: before a row exists, a bad model leaves nothing behind
    dep = registry.create(req.name, req.model, req.model_dump(mode="json"), os.getpid())
    rep = _Reporter(registry, dep.id, req.name)
    proc: subprocess.Popen | None = None
    try:
        rep(10.0, "download")
        if source.path is not None:
            path, sha, tag = source.path, None, readme_pipeline_tag(source.path)
        else:

            def on_bytes(done: int, total: int) -> None:
                rep(10.0 + 45.0 * (done / total if total else 1.0), f"download {done}/{total} bytes")

            got = fetch(
                source.repo_id or "", req.revision, req.download_timeout_s, req.cache_dir, req.hub_endpoint, on_bytes
            )
            path, sha, tag = got.path, got.sha, got.pipeline_tag or readme_pipeline_tag(got.path)
        task_name = req.task or infer_task(_config(path), tag, req.model)
        registry.update(dep.id, task=task_name, sha=sha)
        rep(55.0, "load")
        deadline = time.monotonic() + req.start_timeout_s
        log_path = registry.logs_dir / f"{req.name}-{dep.id}.log"
        for _attempt in range(3):
            port = registry.claim_port(dep.id, req.host, req.port_range, req.port)
            spec = ServerSpec(
                deployment_id=dep.id,
                name=req.name,
                model_id=req.model,
                model_path=str(path),
                revision=req.revision,
                sha=sha,
                task=task_name,
                host=req.host,
                port=port,
                device=req.device,
                dtype=req.dtype,
                max_batch_size=req.max_batch_size,
                max_wait_ms=req.max_wait_ms,
                max_input_tokens=req.max_input_tokens,
                threads=req.threads,
                registry_path=str(registry.path),
            )
            proc = _spawn(spec, registry.logs_dir / f"{req.name}-{dep.id}.spec.json", log_path)
            registry.set_server(dep.id, proc.pid, log_path)
            url = registry.get_id(dep.id).url or ""
            if _wait_serving(proc, url, deadline, registry, dep.id, rep) != "port" or req.port:
                break
            log.info("port %d was taken meanwhile; trying another", port)
        else:
            raise TransientError("could not bind a port from the pool three times")
        rep(85.0, "ready check")
        _ready_check(url, max(10.0, deadline - time.monotonic()))
        rep(100.0, "ready")
        registry.update(dep.id, status=Status.READY)
        rep.bar.close()
        row = registry.get_id(dep.id)
        log.info("deployed %s (%s, %s) at %s", req.name, req.model, task_name, row.url)
        return row
    except BaseException as exc:
        message = exc.message if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
        registry.update(dep.id, status=Status.FAILED, last_error=message)
        if proc is not None:
            _terminate(proc.pid, process_start(proc.pid), 10.0)
        raise


def _terminate(pid: int, start: str | None, timeout: float) -> str:
    """SIGTERM the server named by pid + start time (uvicorn drains open requests), SIGKILL after `timeout`."""
    child = _CHILDREN.pop(pid, None)
    if start is None or process_start(pid) != start:
        if child is not None:
            child.poll()  # reap it
        return "already exited"
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "already exited"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if child is not None and child.poll() is not None:
            return "stopped"
        if child is None and process_start(pid) != start:
            return "stopped"
        if child is None:
            try:
                import psutil

                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    return "stopped"
            except Exception:
                return "stopped"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    if child is not None:
        child.wait(5)
    return "killed"


def stop(name: str, registry: DeploymentRegistry | None = None, timeout: float = 15.0) -> Deployment:
    """Stop the live deployment `name`: its server ends, the row says stopped, its port is free again."""
    registry = registry or DeploymentRegistry()
    dep = registry.latest(name)
    if dep.status not in LIVE:
        raise PermanentError(
            f"deployment {name!r} is not running ({dep.status})", hint="see python -m flows.model_api list"
        )
    how = _terminate(dep.pid, dep.pid_start, timeout) if dep.pid else "no server yet"
    registry.update(dep.id, status=Status.STOPPED, stopped_at=time.time())
    log.info("stopped %s (%s)", name, how)
    return registry.get_id(dep.id)
