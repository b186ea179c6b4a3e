"""What a `training.completed` event may choose (flows/triggered.py): the model name, version, base model,
a host the base config allows and a path under an allowed root. A local source, a stage selection, or
anything outside the allow-lists is refused unless the base config opts in (its `trigger:` section)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.triggered import build_config
from tasks.core.errors import ConfigError


def _base(tmp_path: Path, **trigger) -> str:
    cfg = {
        "model": {"name": "base", "version": "v1"},
        "source": {"kind": "ssh", "host": "gpu-1", "path": "/workspace/out"},
        "trigger": trigger,
    }
    p = tmp_path / "base.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def test_an_event_with_a_local_source_is_refused_by_default(tmp_path):
    home = str(Path.home())
    with pytest.raises(ConfigError, match="trigger.allow_local"):
        build_config("m", home, source_kind="local")
    with pytest.raises(ConfigError, match="trigger.allow_local"):  # the default source is local too
        build_config("m", home)
    with pytest.raises(ConfigError, match="trigger.allow_local"):
        build_config("m", "/workspace/out/run1", source_kind="local", config_path=_base(tmp_path))


def test_a_stage_selection_from_an_event_is_refused_by_default(tmp_path):
    from flows.triggered import event_stages

    base = _base(tmp_path)
    with pytest.raises(ConfigError, match="trigger.allow_stage_selection"):
        event_stages("download", build_config("m", "/workspace/out/r", config_path=base))
    opted = _base(tmp_path, allow_stage_selection=True)
    assert event_stages("download,merge", build_config("m", "/workspace/out/r", config_path=opted)) == [
        "download",
        "merge",
    ]
    assert event_stages("", build_config("m", "/workspace/out/r", config_path=base)) is None


def test_the_path_must_lie_under_an_allowed_root(tmp_path):
    base = _base(tmp_path)  # no allowed_roots: under the base config's source.path
    cfg = build_config("m", "/workspace/out/checkpoint-9", config_path=base)
    assert cfg["source"]["path"] == "/workspace/out/checkpoint-9" and cfg["source"]["host"] == "gpu-1"
    for bad in ("/etc", "/workspace/out/../../root/.ssh", "relative/path", "/workspace/outside"):
        with pytest.raises(ConfigError, match="trigger.allowed_roots"):
            build_config("m", bad, config_path=base)
    roots = _base(tmp_path, allowed_roots=["/data/runs"])
    assert build_config("m", "/data/runs/a", config_path=roots)["source"]["path"] == "/data/runs/a"
    with pytest.raises(ConfigError, match="trigger.allowed_roots"):
        build_config("m", "/workspace/out/a", config_path=roots)


def test_the_host_must_be_allowed(tmp_path):
    base = _base(tmp_path)
    with pytest.raises(ConfigError, match="trigger.allowed_hosts"):
        build_config("m", "/workspace/out/r", host="evil.example.com", config_path=base)
    assert build_config("m", "/workspace/out/r", host="gpu-1", config_path=base)["source"]["host"] == "gpu-1"
    allowed = _base(tmp_path, allowed_hosts=["gpu-2"], host_blocks=["box-3"])
    assert build_config("m", "/workspace/out/r", host="gpu-2", config_path=allowed)["source"]["host"] == "gpu-2"
    blocked = build_config("m", "/workspace/out/r", host="box-3", config_path=allowed)["source"]
    assert blocked["host_block"] == "box-3" and not blocked.get("host")


def test_the_source_kind_and_base_model_cannot_reach_local_files(tmp_path):
    base = _base(tmp_path)
    with pytest.raises(ConfigError, match="source_kind"):
        build_config("m", "/workspace/out/r", source_kind="vastai", config_path=base)
    with pytest.raises(ConfigError, match="base_model"):
        build_config("m", "/workspace/out/r", base_model="/home/someone/models/private", config_path=base)
    cfg = build_config("m", "/workspace/out/r", base_model="Qwen/Qwen2.5-0.5B", version="v9", config_path=base)
    assert cfg["model"] == {**cfg["model"], "name": "m", "version": "v9", "base_model": "Qwen/Qwen2.5-0.5B"}


def test_a_base_config_may_opt_in_to_local_sources(tmp_path):
    adapter = tmp_path / "runs" / "adapter"
    base = tmp_path / "local.yaml"
    base.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "base"},
                "source": {"kind": "local", "path": str(tmp_path / "runs")},
                "trigger": {"allow_local": True, "allowed_roots": [str(tmp_path / "runs")]},
            }
        )
    )
    cfg = build_config("m", str(adapter), source_kind="local", config_path=str(base))
    assert cfg["source"] == {**cfg["source"], "kind": "local", "path": str(adapter)}


def test_the_triggered_flow_refuses_before_any_stage(tmp_path, prefect_api, monkeypatch):
    from flows.triggered import triggered

    monkeypatch.setenv("LORASHIP_RUNS_DIR", str(tmp_path / "runs"))
    state = triggered(model_name="m", path=str(Path.home()), source_kind="local", return_state=True)
    assert state.is_failed() and "trigger.allow_local" in (state.message or "")
    assert not (tmp_path / "runs").exists()
