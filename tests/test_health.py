"""health: verdicts against a real llama.cpp OpenAI-compatible server on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

from tasks.core.artifacts import Artifact
from tasks.evaluate.health import HealthSettings, check_health, health
from tasks.serve.stage import ServeSettings, serve, stop_servers
from tests.deploy_helpers import gguf_artifacts


@pytest.fixture(scope="module")
def server(llama_ggufs, tmp_path_factory):
    arts = gguf_artifacts(llama_ggufs, ("Q4_K_M",))
    made = serve(arts, ServeSettings(n_ctx=256, port_range=(8100, 8200)), tmp_path_factory.mktemp("health-serve"))
    yield arts[0], made[0]
    stop_servers(made)


def test_healthy_server_is_healthy(server, tmp_path):
    gguf, srv = server
    art = health(
        HealthSettings(test_prompts=["Hello!", "What color is the cat?"], max_tokens=8),
        tmp_path / "health",
        srv.meta["base_url"],
        srv.meta["model_id"],
        gguf,
    )
    assert art.name == "report:health" and art.kind == "report"
    assert art.meta["verdict"] == "healthy", art.meta["reasons"]
    report = json.loads((tmp_path / "health" / "health.json").read_text())
    names = {(c["group"], c["name"]) for c in report["checks"]}
    assert {
        ("file", "opens"),
        ("file", "sha256"),
        ("api", "reachable"),
        ("api", "models"),
        ("system", "disk"),
        ("system", "memory"),
    } <= names
    prompts = [c for c in report["checks"] if c["group"] == "model"]
    assert len(prompts) == 2 and all(c["tokens"] > 0 and c["tokens_per_s"] > 0 for c in prompts)
    assert "**healthy**" in (tmp_path / "health" / "health.md").read_text()


def test_too_short_answer_is_degraded(server):
    _, srv = server
    report = check_health(srv.meta["base_url"], HealthSettings(min_response_length=10_000, max_tokens=4))
    assert report["verdict"] == "degraded"
    assert any("shorter than min_response_length" in r for r in report["reasons"])


def test_wrong_model_and_changed_file_are_unhealthy(server, tmp_path):
    gguf, srv = server
    report = check_health(srv.meta["base_url"], HealthSettings(), model_id="someone-else")
    assert report["verdict"] == "unhealthy" and any("not listed" in r for r in report["reasons"])
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(gguf.local_path, copy)
    art = Artifact.from_path(copy, name="gguf:Q4_K_M", kind="gguf", stage="quantize", meta={"quant": "Q4_K_M"})
    with open(copy, "r+b") as fh:  # same size, different content
        fh.seek(art.size - 100)
        fh.write(b"\xff" * 10)
    os.utime(copy, ns=(art.files[0].mtime_ns, art.files[0].mtime_ns))
    report = check_health(srv.meta["base_url"], HealthSettings(max_tokens=4), model_id=srv.meta["model_id"], gguf=art)
    assert report["verdict"] == "unhealthy" and any(r.startswith("file/sha256") for r in report["reasons"])


def test_killed_server_is_unhealthy(llama_ggufs, tmp_path):
    arts = gguf_artifacts(llama_ggufs, ("Q8_0",))
    made = serve(arts, ServeSettings(quant="Q8_0", n_ctx=128, port_range=(8100, 8200)), tmp_path)
    os.kill(made[0].meta["pid"], signal.SIGKILL)
    stop_servers(made)  # reap it
    art = health(
        HealthSettings(max_tokens=4, timeout_s=5),
        tmp_path / "health",
        made[0].meta["base_url"],
        made[0].meta["model_id"],
        arts[0],
    )
    assert art.meta["verdict"] == "unhealthy"
    assert any(r.startswith("api/reachable") for r in art.meta["reasons"])


@pytest.mark.slow
def test_transformers_engine_is_checked_through_its_model_api(tmp_path, monkeypatch):
    """serving.engine transformers: the engine's health_checks speak the model API (/health, /info, a real
    /predict with the test prompts for a text task); nothing listening there is unhealthy, not skipped."""
    from tasks.core.vocab import ArtifactKind
    from tasks.serve.engines import SERVE_ENGINES
    from tasks.support.tiny_models import copy_tree
    from tasks.support.tiny_task_models import tiny_causal_lm
    from tests.ports import free_port

    monkeypatch.setenv("LORASHIP_HOME", str(tmp_path / "home"))
    merged_dir = copy_tree(tiny_causal_lm(), tmp_path / "runs" / "demo" / "v1" / "merged")
    merged = Artifact.from_path(merged_dir, name="merged", kind=ArtifactKind.MERGED, stage="merge")
    engine = SERVE_ENGINES["transformers"]
    (rec,) = engine.start([merged], ServeSettings(engine="transformers", threads=1), tmp_path / "reports")
    try:
        settings = HealthSettings(test_prompts=["Hello!", "Once upon"], max_tokens=4)
        report = check_health(rec.meta["base_url"], settings, model_id=rec.meta["model_id"], engine="transformers")
    finally:
        engine.stop([rec], 10)
    assert report["verdict"] == "healthy", report["reasons"]
    checks = {(c["group"], c["name"]): c for c in report["checks"]}
    assert checks[("api", "info")]["task"] == "text-generation" and ("api", "models") not in checks
    prompts = [checks[("model", "prompt: Hello!")], checks[("model", "prompt: Once upon")]]
    assert all(c["status"] == "pass" and c["answer_chars"] > 0 and c["inference_ms"] > 0 for c in prompts)
    assert report["model_id"] == "demo-v1" and report["summary"]["mean_answer_chars"] > 0
    gone = check_health(f"http://127.0.0.1:{free_port()}", HealthSettings(timeout_s=5), engine="transformers")
    assert gone["verdict"] == "unhealthy" and gone["reasons"][0].startswith("api/reachable: ")
