"""Deploying: the six steps through real server subprocesses, the SQLite registry, the Hub download through
the real huggingface_hub client against the local Hub server (tests/hub_server.py), and the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tasks.core.constants import PROJECT_ROOT
from tasks.core.errors import PermanentError
from tasks.model_api.deploy import deploy, stop
from tasks.model_api.registry import DeploymentRegistry, Status, port_is_free
from tasks.model_api.settings import DeployRequest
from tasks.support.tiny_task_models import tiny_bert, tiny_causal_lm

pytestmark = pytest.mark.slow


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASHIP_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def registry(home):
    reg = DeploymentRegistry()
    yield reg
    for d in reg.list():  # never leave a server behind
        try:
            stop(d.name, reg, timeout=5)
        except PermanentError:
            pass


def _hub_model(hub_server, folder: Path, repo: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_server.url, token="hf_write_alice")
    api.create_repo(repo)
    api.upload_folder(folder_path=str(folder), repo_id=repo, ignore_patterns=[".complete"])
    return repo


def _req(model: str, name: str, hub_server=None, **kw) -> DeployRequest:
    return DeployRequest(
        model=model,
        name=name,
        hub_endpoint=hub_server.url if hub_server else None,
        threads=1,
        start_timeout_s=240,
        **kw,
    )


def test_deploy_from_the_hub_shares_the_cache_ports_names_kill_and_stop(hub_server, registry, tmp_path):
    repo = _hub_model(hub_server, tiny_bert("text-classification"), "alice/tiny-cls")
    cache = str(tmp_path / "hub-cache")
    a = deploy(_req(repo, "a", hub_server, cache_dir=cache), registry)
    assert a.status == Status.READY and a.progress == 100.0 and a.task == "text-classification"
    assert a.sha == hub_server.state.repo(repo).head.oid  # the revision sha of the snapshot
    info = requests.get(f"{a.url}/info", timeout=10).json()
    assert info["sha"] == a.sha and info["model_id"] == repo and info["task"] == "text-classification"
    downloads = len(hub_server.state.calls("GET", r"/resolve/"))
    assert downloads >= 3  # config, weights, tokenizer files

    # two more at once, same model: different ports, nothing downloaded again
    with ThreadPoolExecutor(2) as pool:
        b, c = pool.map(lambda n: deploy(_req(repo, n, hub_server, cache_dir=cache), registry), ["b", "c"])
    assert len({a.port, b.port, c.port}) == 3 and all(8100 <= d.port <= 8200 for d in (a, b, c))
    assert len(hub_server.state.calls("GET", r"/resolve/")) == downloads
    assert requests.post(f"{c.url}/predict", json={"text": "hello"}, timeout=30).json()["status"] == "ok"

    # a name in use is refused, before anything is downloaded or started
    with pytest.raises(PermanentError, match="name 'a' is in use"):
        deploy(_req(repo, "a", hub_server, cache_dir=cache), registry)
    assert {d.name for d in registry.list()} == {"a", "b", "c"}

    # a killed server: list reconciles it to stopped, and its port and name are free again
    os.kill(b.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "b" in {d.name for d in registry.list()}:
        time.sleep(0.1)
    assert "b" not in {d.name for d in registry.list()}
    assert registry.latest("b").status == Status.STOPPED
    assert b.port not in {d.port for d in registry.list()}
    if port_is_free("127.0.0.1", b.port):  # other sessions' servers use the same pool and may take it meanwhile
        probe = registry.create("probe", repo, {}, os.getpid())
        assert registry.claim_port(probe.id, "127.0.0.1", (b.port, b.port)) == b.port
        registry.update(probe.id, status=Status.STOPPED)

    # stop: the row says stopped and the port can be bound again
    stopped = stop("c", registry)
    assert stopped.status == Status.STOPPED and c.port not in {d.port for d in registry.list()}
    with pytest.raises(requests.ConnectionError):  # nothing listens there any more
        requests.get(f"{c.url}/health", timeout=5)
    assert "c" not in {d.name for d in registry.list()}
    assert [d.name for d in registry.list()] == ["a"]


def test_download_timeout_fails_clearly(registry):
    # a "Hub" that accepts connections and never answers
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)

    class Hub:
        url = f"http://127.0.0.1:{hole.getsockname()[1]}"

    t0 = time.monotonic()
    try:
        with pytest.raises(PermanentError, match=r"download_timeout_s=1.5s"):
            deploy(_req("alice/slow-model", "slow", Hub, download_timeout_s=1.5), registry)
    finally:
        hole.close()
    assert time.monotonic() - t0 < 10
    row = registry.latest("slow")
    assert row.status == Status.FAILED and "download_timeout_s" in (row.last_error or "")


def test_a_model_that_is_not_there_fails_in_validate(registry, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PermanentError, match="has no config.json"):
        deploy(_req(str(tmp_path / "empty"), "nothing"), registry)
    with pytest.raises(PermanentError, match="neither a folder nor a Hub id"):
        deploy(_req("not a/valid id!", "nothing"), registry)
    assert registry.list(all_rows=True) == []  # nothing recorded, nothing started


def _cli(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.model_api", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(PROJECT_ROOT),
    )


def test_cli_deploy_status_logs_list_stop_of_a_run_folder(home, tmp_path):
    run = tmp_path / "runs" / "demo" / "v1"
    run.mkdir(parents=True)
    (run / "merged").symlink_to(tiny_causal_lm())
    env = {**os.environ, "LORASHIP_HOME": str(home), "PYTHONPATH": str(PROJECT_ROOT)}

    r = _cli("deploy", str(run), "--name", "gen", "--threads", "1", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "ready" and out["task"] == "text-generation" and out["url"].endswith(str(out["port"]))
    try:
        got = requests.post(f"{out['url']}/predict", json={"text": "Once", "parameters": {"max_new_tokens": 4}})
        assert got.status_code == 200 and isinstance(got.json()["result"]["generated_text"], str)

        st = json.loads(_cli("status", "gen", "--json", env=env).stdout)
        assert st["status"] == "ready" and st["progress"] == 100.0 and st["pid"] == out["pid"]
        listed = json.loads(_cli("list", "--json", env=env).stdout)
        assert [d["name"] for d in listed] == ["gen"]
        logs = _cli("logs", "gen", env=env)
        assert logs.returncode == 0 and "serving gen" in logs.stdout

        again = _cli("deploy", str(run), "--name", "gen", env=env)
        assert again.returncode == 1 and "in use" in again.stderr
        bad = _cli("deploy", str(run), "--name", "x", "--max-batch-size", "0", env=env)
        assert bad.returncode == 2 and "max_batch_size" in bad.stderr
    finally:
        assert _cli("stop", "gen", env=env).returncode == 0
    assert json.loads(_cli("list", "--json", env=env).stdout) == []
    assert json.loads(_cli("status", "gen", "--json", env=env).stdout)["status"] == "stopped"


def test_registry_port_claims_do_not_race(home):
    """Twenty deployments claiming ports at once (threads in one process and one database) never share one."""
    reg = DeploymentRegistry()
    deps = [reg.create(f"d{i}", "m", {}, os.getpid()) for i in range(20)]
    ports: list[int] = []
    lock = threading.Lock()

    def claim(dep_id: str) -> None:
        p = DeploymentRegistry(reg.path).claim_port(dep_id, "127.0.0.1", (8100, 8200))
        with lock:
            ports.append(p)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(claim, [d.id for d in deps]))
    assert len(ports) == 20 and len(set(ports)) == 20
