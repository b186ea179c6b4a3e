"""Conformance of every registered merge backend (tasks/merge/backends/), and the registry's own rules.

The same checks run over each entry of MERGE_BACKENDS: a well-formed contract, documented in the settings
and the README, accepted by config validation, and either a real merge of the tiny Llama fixture that
reproduces PeftModel(base, adapter) (the stage's logits check, on) or, where the backend cannot run here
(unsloth without CUDA on this machine), an immediate failure that gives the reason and names the
backends that can run. A new backend gets all of this by being in the table.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.config import parse_config
from tasks.core.errors import ConfigError, PermanentError
from tasks.core.registry import Registry
from tasks.merge.backends import DEFAULT_BACKEND, MERGE_BACKENDS, MergeBackend
from tasks.merge.stage import MergeSettings, merge
from tests.merge_helpers import as_artifact

ROOT = Path(__file__).resolve().parents[1]
NAMES = list(MERGE_BACKENDS)
MINIMAL = {"model": {"name": "m"}, "source": {"kind": "local", "path": "/tmp/adapter"}}


@pytest.mark.parametrize("name", NAMES)
def test_backend_contract(name):
    backend = MERGE_BACKENDS[name]
    assert isinstance(backend, MergeBackend) and backend.name == name
    assert type(backend).run is not MergeBackend.run
    assert backend.description and "\n" not in backend.description and len(backend.description) <= 100
    reason = backend.unavailable()
    assert reason is None or (isinstance(reason, str) and reason.strip())
    assert f"{name}: {backend.description}" in MergeSettings.model_fields["backend"].description
    assert MergeSettings(backend=name).backend == name
    assert f"`{name}`" in (ROOT / "README.md").read_text(), f"README's merge section does not document {name}"


@pytest.mark.parametrize("name", NAMES)
def test_backend_merges_or_says_why_not(name, llama_base, llama_adapter, tmp_path):
    backend = MERGE_BACKENDS[name]
    settings = MergeSettings(backend=name, base_model=str(llama_base), verify="always")
    reason = backend.unavailable()
    if reason is None:
        art = merge(as_artifact(llama_adapter), settings, tmp_path / "merged")
        assert art.meta["backend"] == name and art.meta["verify_passed"]
        assert art.meta["max_abs_logit_diff"] < 1e-3 < art.meta["adapter_effect_max_abs_logit"]
        assert list(Path(art.path).glob("*.safetensors")) and (Path(art.path) / "config.json").is_file()
    else:
        with pytest.raises(PermanentError) as err:
            merge(as_artifact(llama_adapter), settings, tmp_path / "merged")
        assert reason in str(err.value) and f"merge.backend: {name}" in str(err.value)
        for other in MERGE_BACKENDS.values():
            if other.name != name and other.unavailable() is None:
                assert f"merge.backend: {other.name}" in str(err.value)
        assert not (tmp_path / "merged").exists()


def test_unknown_backend_lists_the_registered_ones():
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, "merge": {"backend": "streamin"}})
    text = str(err.value)
    assert "merge.backend" in text and "did you mean 'streaming'" in text
    assert f"registered: {', '.join(NAMES)}" in text
    with pytest.raises(ValidationError):
        MergeSettings(backend="mergekit")
    assert MergeSettings().backend == DEFAULT_BACKEND in NAMES


def test_registry_refuses_duplicates_and_names_the_field_on_lookup():
    reg = Registry("merge backend", "merge.backend", list(MERGE_BACKENDS.values()))
    with pytest.raises(ValueError):
        reg.register(MERGE_BACKENDS[DEFAULT_BACKEND])
    with pytest.raises(PermanentError) as err:
        reg.lookup("nope")
    assert "merge.backend: unknown merge backend 'nope'" in str(err.value) and "streaming" in str(err.value)
