"""deployment_config.yaml validation: field paths, suggestions, secrets never inline."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.config import load_config, parse_config
from tasks.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"name": "m"}, "source": {"kind": "local", "path": "/tmp/adapter"}}


def test_example_config_is_valid():
    cfg = load_config(ROOT / "deployments" / "deployment_config.example.yaml")
    assert cfg.model.name and cfg.quantization.types


def test_minimal_defaults():
    cfg = parse_config(MINIMAL)
    assert cfg.quantization.types == ["Q4_K_M", "Q5_K_M", "Q8_0"]
    assert cfg.run_dir() == Path("runs/m/v1")


def test_unknown_key_names_path_and_suggests():
    with pytest.raises(ConfigError) as e:
        parse_config({**MINIMAL, "quantization": {"typs": ["Q4_K_M"]}})
    assert "quantization.typs" in str(e.value) and "did you mean 'types'" in str(e.value)


def test_wrong_type_names_path():
    with pytest.raises(ConfigError) as e:
        parse_config({**MINIMAL, "pipeline": {"continue_on_error": "maybe"}})
    assert "pipeline.continue_on_error" in str(e.value)


def test_unknown_stage_suggests():
    with pytest.raises(ConfigError) as e:
        parse_config({**MINIMAL, "pipeline": {"stages": ["download", "merg"]}})
    assert "pipeline.stages" in str(e.value) and "did you mean 'merge'" in str(e.value)


def test_inline_secret_refused_and_reference_accepted(monkeypatch):
    with pytest.raises(ConfigError) as e:
        parse_config({**MINIMAL, "hub": {"token": "hf_abcdefabcdef"}})
    assert "hub.token" in str(e.value) and "env:HF_TOKEN" in str(e.value)
    assert "hf_abcdefabcdef" not in str(e.value)
    cfg = parse_config({**MINIMAL, "hub": {"token": "env:MY_TOKEN"}})
    monkeypatch.setenv("MY_TOKEN", "hf_secret_value")
    assert cfg.hub.token.resolve().get_secret_value() == "hf_secret_value"
    assert "hf_secret_value" not in cfg.model_dump_json()


def test_impossible_combination():
    with pytest.raises(ConfigError) as e:
        parse_config({**MINIMAL, "pipeline": {"cleanup": {"delete_f16": True}}})
    assert "delete_f16" in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"model": {"name": "m"}}))
    with pytest.raises(ConfigError) as e:
        load_config(missing)
    assert "source: required" in str(e.value)


def test_cli_rejects_bad_file_with_path(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "c.yaml"
    bad.write_text(yaml.safe_dump({**MINIMAL, "quantization": {"types": "Q4_K_M", "thread": 2}}))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.full", "--config", str(bad), "--validate"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "quantization.thread" in proc.stderr and "quantization.types" in proc.stderr


def test_cli_help_explains_options():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "flows.full", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0
    for word in ("--config", "--only", "--skip", "--from", "--dry-run", "--refresh", "demo"):
        assert word in proc.stdout
