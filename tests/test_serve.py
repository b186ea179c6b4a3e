"""serve: llama-cpp-python's OpenAI server plus /health, /info, /predict, on ports from a pool (real processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import requests

from tasks.core.errors import PermanentError
from tasks.serve.stage import ServeSettings, serve, stop_servers
from tests.deploy_helpers import gguf_artifacts
from tests.ports import free_port_range, silent_listener

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def two_servers(llama_ggufs, tmp_path_factory):
    """Q4_K_M and Q8_0 served at once; the first port of the pool is held busy by a plain socket."""
    base = free_port_range(21)
    with silent_listener(base):
        arts = gguf_artifacts(llama_ggufs)
        made = serve(
            arts,
            ServeSettings(quant="Q4_K_M", extra_quants=["Q8_0"], port_range=(base, base + 20), n_ctx=256),
            tmp_path_factory.mktemp("serve"),
        )
        yield arts, made, base
        stop_servers(made)


def test_two_models_on_separate_ports_from_the_pool(two_servers):
    arts, made, base = two_servers
    ports = [a.meta["port"] for a in made]
    assert len(set(ports)) == 2 and all(base < p <= base + 20 for p in ports)  # base was busy
    for a in made:
        models = requests.get(f"{a.meta['base_url']}/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == [a.meta["model_id"]]
        rec = json.loads(Path(a.path).read_text())
        assert rec["pid"] == a.meta["pid"] and psutil.pid_exists(rec["pid"])


def test_info_and_health(two_servers):
    arts, made, _ = two_servers
    q4 = next(a for a in arts if a.meta["quant"] == "Q4_K_M")
    info = requests.get(f"{made[0].meta['url']}/info", timeout=10).json()
    assert (
        info["quant"] == "Q4_K_M" and info["sha256"] == q4.sha256 and info["size"] == q4.size and info["context"] == 256
    )
    assert requests.get(f"{made[0].meta['url']}/health", timeout=10).json()["status"] == "ok"


def test_predict_batch_and_single(two_servers):
    _, made, _ = two_servers
    url = f"{made[0].meta['url']}/predict"
    r = requests.post(
        url, json={"texts": ["What color is the cat?", "Spell gguf.", "Hello!"], "max_tokens": 8}, timeout=60
    )
    assert r.status_code == 200
    preds = r.json()["predictions"]
    assert [p["input"] for p in preds] == ["What color is the cat?", "Spell gguf.", "Hello!"]
    assert all(isinstance(p["generated_text"], str) and p["inference_time_ms"] > 0 and p["tokens"] > 0 for p in preds)
    one = requests.post(url, json={"text": "Hello!", "max_tokens": 4}, timeout=60).json()["predictions"]
    assert len(one) == 1
    assert requests.post(url, json={"texts": []}, timeout=10).status_code == 422
    chat = requests.post(
        f"{made[0].meta['base_url']}/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        timeout=60,
    )
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] > 0


def test_graceful_stop_frees_port_and_cli_stop(llama_ggufs, tmp_path):
    base = free_port_range(6)
    made = serve(
        gguf_artifacts(llama_ggufs, ("Q4_K_M",)), ServeSettings(port_range=(base, base + 5), n_ctx=128), tmp_path
    )
    pid, port = made[0].meta["pid"], made[0].meta["port"]
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.serve", "stop", made[0].path],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "stopped" in proc.stdout
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with silent_listener(port):  # the port is free again
        pass
    stop_servers(made)  # reaps the child; already stopped


def test_unknown_quant_is_permanent(llama_ggufs, tmp_path):
    with pytest.raises(PermanentError, match="Q3_K_S"):
        serve(gguf_artifacts(llama_ggufs), ServeSettings(quant="Q3_K_S"), tmp_path)


def test_a_port_another_server_took_meanwhile_is_not_mistaken_for_ours(llama_ggufs, tmp_path, monkeypatch):
    """Between finding a free port and the new server binding it, another process may take it (parallel runs
    share the pool). Its /health must not count as ours: the stage checks the pid and moves on to another port."""
    import http.server
    import threading

    from tasks.serve import stage

    class Foreign(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = json.dumps({"status": "ok", "model": "someone-else", "pid": 1}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    foreign = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Foreign)
    threading.Thread(target=foreign.serve_forever, daemon=True).start()
    taken = foreign.server_address[1]
    real = stage.free_port
    ports = iter([taken])
    monkeypatch.setattr(stage, "free_port", lambda host, rng: next(ports, None) or real(host, rng))
    try:
        base = free_port_range(6)
        made = serve(
            gguf_artifacts(llama_ggufs, ("Q4_K_M",)), ServeSettings(port_range=(base, base + 5), n_ctx=128), tmp_path
        )
        try:
            assert made[0].meta["port"] != taken
            health = requests.get(f"{made[0].meta['url']}/health", timeout=10).json()
            assert health["pid"] == made[0].meta["pid"] and health["model"] == made[0].meta["model_id"]
        finally:
            stop_servers(made)
    finally:
        foreign.shutdown()
