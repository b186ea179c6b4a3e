"""Conformance of every registered local target (tasks/local/targets/), and deployment.targets validation.

The same checks run over each entry of LOCAL_TARGETS: a well-formed contract (name, title, one-line
description, availability that never raises and gives a reason), documented in the settings and the
README, accepted by config validation, a dry run that writes only into the run folder, and a real deploy
into a temporary LM Studio home whose record is `local:<name>`. The desktop apps' CLIs (`lms`, `ollama`)
cannot run here: a recording script stands in for each (tests/deploy_helpers.py). A new target gets all of
this by being in the table.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.config import parse_config
from tasks.core.errors import ConfigError, PermanentError
from tasks.core.registry import Registry
from tasks.local.settings import LocalDeploySettings
from tasks.local.stage import local_deploy
from tasks.local.targets import LOCAL_TARGETS, Availability, LocalTarget
from tests.deploy_helpers import fake_cli, gguf_artifacts, path_with

ROOT = Path(__file__).resolve().parents[1]
NAMES = list(LOCAL_TARGETS)
CLI = {"lmstudio": "lms", "ollama": "ollama"}
MINIMAL = {"model": {"name": "m"}, "source": {"kind": "local", "path": "/tmp/adapter"}}


def _settings(tmp_path: Path, name: str, **kw) -> LocalDeploySettings:
    return LocalDeploySettings(targets=[name], lmstudio_home=str(tmp_path / "lmstudio"), **kw)


def test_the_table_is_a_registry_of_targets():
    assert isinstance(LOCAL_TARGETS, Registry) and NAMES == ["lmstudio", "ollama"]
    assert LOCAL_TARGETS.field == "deployment.targets"


@pytest.mark.parametrize("name", NAMES)
def test_target_contract(name, tmp_path, monkeypatch):
    target = LOCAL_TARGETS[name]
    assert isinstance(target, LocalTarget) and target.name == name and target.record_name == f"local:{name}"
    assert type(target).deploy is not LocalTarget.deploy and type(target).availability is not LocalTarget.availability
    assert target.title and target.description and "\n" not in target.description and len(target.description) <= 110
    assert target.describe().startswith(target.title)
    assert f"{name}: {target.description}" in LocalDeploySettings.model_fields["targets"].description
    assert f"`{name}`" in (ROOT / "README.md").read_text(), f"README's local_deploy section does not document {name}"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no desktop CLI: not ready, and the reason says what happens
    off = target.availability(_settings(tmp_path, name))
    assert isinstance(off, Availability) and off.ready is False and off.reason.strip()
    fake_cli(tmp_path / "bin", CLI[name])
    monkeypatch.setenv("PATH", path_with(tmp_path / "bin"))
    on = target.availability(_settings(tmp_path, name))
    assert on.ready is True and CLI[name] in on.reason


@pytest.mark.parametrize("name", NAMES)
def test_config_validation_reads_the_registry(name):
    cfg = parse_config({**MINIMAL, "deployment": {"targets": [name]}})
    assert cfg.deployment.targets == [name]
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, "deployment": {"targets": [name + "x"]}})
    assert "deployment.targets" in str(err.value) and f"did you mean '{name}'" in str(err.value)
    assert "registered: lmstudio, ollama" in str(err.value)
    assert LocalDeploySettings(**{f"{name}_enabled": False}).targets == [n for n in NAMES if n != name]
    with pytest.raises(PermanentError, match="deployment.targets: unknown local target"):
        LOCAL_TARGETS.lookup(name + "x")
    with pytest.raises(ValidationError, match="twice"):
        LocalDeploySettings(targets=[name, name])


@pytest.mark.parametrize("name", NAMES)
def test_dry_run_writes_only_into_the_run_folder(name, tmp_path, llama_ggufs, monkeypatch):
    fake = fake_cli(tmp_path / "bin", CLI[name])
    monkeypatch.setenv("PATH", path_with(tmp_path / "bin"))
    arts = local_deploy(gguf_artifacts(llama_ggufs), _settings(tmp_path, name), "demo", tmp_path / "out", dry_run=True)
    assert [a.name for a in arts] == [f"local:{name}"] and arts[0].kind == "publish"
    assert Path(arts[0].path).resolve().is_relative_to((tmp_path / "out").resolve())
    assert not (tmp_path / "lmstudio").exists() and not (tmp_path / "bin" / f"{fake.name}.calls").exists()


@pytest.mark.parametrize("name", NAMES)
def test_deploy_returns_its_record(name, tmp_path, llama_ggufs, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    arts = local_deploy(gguf_artifacts(llama_ggufs), _settings(tmp_path, name), "demo", tmp_path / "out")
    assert [a.name for a in arts] == [f"local:{name}"] and arts[0].sha256 and arts[0].stage == "local_deploy"
    assert arts[0].inputs  # made from the GGUFs: provenance in the manifest
