"""Orchestration pieces that need no Prefect server: the training-side event, the served deployments'
parity with prefect.yaml, event parameters -> config, the summary markdown, cleanup, task runner choice."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_event_shape_and_curl_one_liner() -> None:
    from deployments.notify import build_event, curl_command

    ev = build_event("my-model", "/workspace/out/final", host="gpu-box", base_model="Qwen/Qwen2.5-7B-Instruct")
    assert ev["event"] == "training.completed"
    assert ev["resource"]["prefect.resource.id"] == "loraship.training.my-model"
    assert ev["payload"] == {
        "model": "my-model",
        "path": "/workspace/out/final",
        "host": "gpu-box",
        "source_kind": "ssh",
        "base_model": "Qwen/Qwen2.5-7B-Instruct",
        "version": "",
        "only": "",
    }
    assert build_event("m", "/p")["payload"]["source_kind"] == ""  # the base config decides (local: opt-in)
    cmd = curl_command("http://prefect:4200/api/", ev)
    argv = shlex.split(cmd)
    assert argv[:2] == ["curl", "-fsS"] and "http://prefect:4200/api/events" in argv
    assert argv[argv.index("-u") + 1] == "$PREFECT_API_AUTH_STRING"  # expanded by the shell, never on the line
    body = json.loads(argv[argv.index("-d") + 1])
    assert body[0]["payload"]["path"] == "/workspace/out/final"


def test_notify_cli_without_server_says_why(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "deployments.notify",
            "--model",
            "m",
            "--path",
            "/p",
            "--api-url",
            "http://127.0.0.1:9/api",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "cannot reach http://127.0.0.1:9/api" in out.stderr


def test_served_deployments_match_prefect_yaml() -> None:
    from deployments.serve import PREFECT_YAML, build_deployments

    spec = {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    served = {d.name: d for d in build_deployments()}
    assert (
        set(served)
        == set(spec)
        == {
            "loraship-full",
            "loraship-nightly-health",
            "loraship-on-training",
            "loraship-space-idle",
            "loraship-model-api",
            "loraship-model-api-stop",
        }
    )
    for name, d in served.items():
        assert d.parameters == spec[name].get("parameters", {})
    assert [s.schedule.cron for s in served["loraship-nightly-health"].schedules] == ["0 3 * * *"]
    (trigger,) = served["loraship-on-training"].triggers
    assert trigger.expect == {"training.completed"}
    assert trigger.parameters == spec["loraship-on-training"]["triggers"][0]["parameters"]
    assert trigger.parameters["model_name"] == "{{ event.payload.model }}"
    assert served["loraship-on-training"].entrypoint.endswith("flows/triggered.py:triggered")
    assert [
        s.schedule.cron for s in build_deployments(cron="15 1 * * *", names=["loraship-nightly-health"])[0].schedules
    ] == ["15 1 * * *"]


def test_event_parameters_become_a_valid_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.triggered import _stage_list, build_config
    from tasks.core.errors import ConfigError

    base = tmp_path / "base.yaml"
    base.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "x", "version": "v7"},
                "source": {"kind": "local", "path": "/old"},
                "quantization": {"types": ["Q8_0"]},
                "trigger": {"allow_local": True, "allowed_roots": ["/new"]},  # this base config opts in
            }
        )
    )
    monkeypatch.setenv("LORASHIP_RUNS_DIR", str(tmp_path / "runs"))
    cfg = build_config("fresh", "/new/adapter", base_model="/models/base", config_path=str(base))
    assert cfg["model"]["name"] == "fresh" and cfg["model"]["version"] == "v7"
    assert cfg["source"]["path"] == "/new/adapter"
    assert cfg["merge"]["base_model"] == "/models/base"
    assert cfg["quantization"]["types"] == ["Q8_0"]
    assert cfg["pipeline"]["runs_dir"] == str(tmp_path / "runs")
    with pytest.raises(ConfigError, match="no model name"):
        build_config("", "/p")
    with pytest.raises(ConfigError, match="model.name"):
        build_config("bad name!", "")  # (a path from an event would be refused first: no base config opts in)
    assert _stage_list("download, merge") == ["download", "merge"]
    assert _stage_list("") is None


def test_summary_markdown_and_notification_text() -> None:
    from flows.notifications import compose, events_for
    from flows.orchestration import summary_markdown
    from flows.summary import RunSummary, StageOutcome

    s = RunSummary(
        model="m",
        version="v1",
        run_dir="/r",
        manifest="/r/manifest.json",
        degraded=True,
        stages=[
            StageOutcome(stage="download", status="done", seconds=1.25),
            StageOutcome(stage="space", status="degraded", message="boom | bad"),
        ],
        links={"hub": "https://huggingface.co/u/m-GGUF"},
    )
    md = summary_markdown(s)
    assert "# m v1: DEGRADED" in md and "| space | degraded | 0.0 | boom \\| bad |" in md
    assert "- **hub**: https://huggingface.co/u/m-GGUF" in md
    assert events_for(s, failed=False) == ["completed", "degraded"]
    assert events_for(s, failed=True) == ["failed"]
    subject, body = compose(s, "failed", error="merge: OOM", run_url="http://ui/runs/flow-run/1")
    assert subject == "loraship: m v1 FAILED"
    assert (
        "error: merge: OOM" in body
        and "hub: https://huggingface.co/u/m-GGUF" in body
        and "prefect run: http://ui/runs/flow-run/1" in body
    )


def test_notification_errors_hide_webhook_urls() -> None:
    from flows.notifications import _redacted

    msg = _redacted(RuntimeError("Client error '404' for url 'https://hooks.slack.com/services/T0/B0/SECRETKEY'"))
    assert "SECRETKEY" not in msg and "<url>" in msg


def test_cleanup_removes_only_what_was_superseded(tmp_path: Path) -> None:
    from flows.cleanup import cleanup_intermediates
    from flows.config import parse_config
    from tasks.core.artifacts import Artifact

    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "model.safetensors").write_bytes(b"x" * 10)
    f16 = tmp_path / "m-F16.gguf"
    f16.write_bytes(b"f" * 10)
    q4 = tmp_path / "m-Q4_K_M.gguf"
    q4.write_bytes(b"q" * 10)
    arts = {
        "merged": Artifact.from_path(merged, name="merged", kind="merged", stage="merge"),
        "gguf:F16": Artifact.from_path(f16, name="gguf:F16", kind="gguf", stage="convert", meta={"quant": "F16"}),
    }
    cfg = parse_config(
        {
            "model": {"name": "m"},
            "source": {"path": "/p"},
            "pipeline": {
                "stages": ["download", "merge", "convert", "quantize"],
                "cleanup": {"delete_f16": True, "delete_merged": True},
            },
        }
    )
    # No quantization yet: the F16 stays; merged/ goes (a GGUF was made from it).
    assert cleanup_intermediates(cfg, arts) == [str(merged)]
    assert f16.exists() and not merged.exists()
    arts["gguf:Q4_K_M"] = Artifact.from_path(
        q4, name="gguf:Q4_K_M", kind="gguf", stage="quantize", meta={"quant": "Q4_K_M"}
    )
    assert cleanup_intermediates(cfg, arts) == [str(f16)]
    assert q4.exists() and not f16.exists()
    off = parse_config({"model": {"name": "m"}, "source": {"path": "/p"}})
    q4b = tmp_path / "keep.gguf"
    q4b.write_bytes(b"k")
    assert (
        cleanup_intermediates(off, {"a": Artifact.from_path(q4b, name="gguf:F16", kind="gguf", stage="convert")}) == []
    )


def test_task_runner_choice() -> None:
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.config import parse_config
    from flows.task_runners import task_runner_for
    from tasks.core.errors import PermanentError

    base = {"model": {"name": "m"}, "source": {"path": "/p"}}
    assert task_runner_for(parse_config(base)) is None
    runner = task_runner_for(parse_config({**base, "performance": {"parallelism": 3}}))
    assert isinstance(runner, ThreadPoolTaskRunner) and runner._max_workers == 3
    dask_cfg = parse_config({**base, "performance": {"task_runner": "dask"}})
    try:
        import prefect_dask  # noqa: F401
    except ImportError:
        with pytest.raises(PermanentError, match="prefect-dask is not installed"):
            task_runner_for(dask_cfg)
    else:
        assert type(task_runner_for(dask_cfg)).__name__ == "DaskTaskRunner"
