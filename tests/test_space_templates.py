"""Conformance over every registered Space template, and the registry's choices and errors.

Each template is rendered with sample inputs and checked: the manifest's files are in the folder, the
README's Spaces header matches the manifest, the app reads exactly the variables the manifest sets (and no
other upper-case setting than the platform's), its requirements are pinned, the smoke test's endpoint is
declared in the app, and the sdk_version is the Gradio the browser tests run (the test extra's pin).
"""

from __future__ import annotations

import py_compile
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from tasks.core.errors import PermanentError
from tasks.publish.space import SpaceSettings
from tasks.publish.space_templates import (
    SPACE_TEMPLATES,
    SpaceInputs,
    choose_template,
    load_template,
    model_task,
)

# settings an app may read that the platform (Spaces, Gradio, huggingface_hub) sets, not the manifest
PLATFORM = {"HF_TOKEN", "HF_HOME", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "SPACE_ID", "SPACES_ZERO_GPU"}
SAMPLE = SpaceInputs(
    model_repo="alice/tiny-GGUF",
    model_file="tiny-Q4_K_M.gguf",
    model_url="http://hub/alice/tiny-GGUF",
    title="Tiny: a test",
    examples='["Hello"]',
    max_tokens="16",
    rate_limit_per_minute="5",
)


def test_the_registry_holds_the_shipped_templates():
    assert {"gguf_chat"} <= set(SPACE_TEMPLATES)
    on_disk = {p.parent.name for p in (Path(__file__).parents[1] / "templates" / "spaces").glob("*/manifest.yaml")}
    assert set(SPACE_TEMPLATES) == on_disk


@pytest.mark.parametrize("name", list(SPACE_TEMPLATES))
def test_template_conformance(name, tmp_path):
    t = SPACE_TEMPLATES[name]
    m = t.manifest
    out = t.render_to(tmp_path / name, SAMPLE, "apache-2.0")
    for rel in [*m.copy_files, *m.shared, *(r.removesuffix(".j2") for r in m.render)]:
        assert (out / rel).exists(), f"{name}: {rel} missing from the rendered Space"
    header = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert header["sdk"] == m.sdk and header["sdk_version"] == m.sdk_version and header["app_file"] == m.app_file
    assert header["models"] == [SAMPLE.model_repo] and header["title"] == SAMPLE.title
    assert m.sdk_version == version("gradio"), f"{name}: the browser tests run gradio {version('gradio')}"
    app = (out / m.app_file).read_text()
    for py in out.glob("*.py"):
        py_compile.compile(str(py), doraise=True)
    # the app reads a variable directly, or through the shared module's env_int / env_examples (EXAMPLES)
    read = set(re.findall(r"""(?:environ(?:\.get\(|\[)|env_int\()\s*["']([A-Z][A-Z0-9_]+)["']""", app))
    read |= {"EXAMPLES"} if re.search(r"\benv_examples\(", app) else set()
    declared = set(m.variables) | set(m.optional_variables)
    assert declared - PLATFORM <= read, f"{name}: the manifest names variables the app never reads: {declared - read}"
    assert read - declared <= PLATFORM, f"{name}: the app reads settings the manifest does not name"
    api = m.smoke.api_name.lstrip("/")
    assert re.search(rf"""api_name=["']{api}["']""", app), f"{name}: the app declares no {m.smoke.api_name} endpoint"
    assert re.search(r"^\s+activity\(\)$", app, re.M), f"{name}: the idle schedule needs an activity line per request"
    shared = "\n".join((out / rel).read_text() for rel in m.shared)
    assert "loraship: activity" in (app + shared), f"{name}: no app or shared file prints the activity line"
    reqs = [ln.strip() for ln in (out / "requirements.txt").read_text().splitlines()]
    reqs = [ln for ln in reqs if ln and not ln.startswith(("#", "--"))]
    assert reqs and all("==" in ln for ln in reqs), f"{name}: requirements must be pinned: {reqs}"
    assert not any(ln.split("==")[0].lower() == "gradio" for ln in reqs), "gradio comes from sdk_version"
    assert all(f.is_file() for f in t.files()) and t.folder / "manifest.yaml" in t.files()


@pytest.mark.parametrize("name", list(SPACE_TEMPLATES))
def test_every_template_is_chosen_by_auto_for_its_task_or_named(name):
    t = SPACE_TEMPLATES[name]
    assert choose_template(name, "anything", {t.manifest.runs_from}) is t
    for task in t.manifest.tasks:
        assert task in choose_template("auto", task, {"gguf", "merged", "adapter"}).manifest.tasks


def test_auto_prefers_what_was_published():
    assert choose_template("auto", "text-generation", {"gguf"}).name == "gguf_chat"
    with pytest.raises(PermanentError, match="no Space template serves 'text-generation'") as err:
        choose_template("auto", "text-generation", {"adapter"})
    assert "published: adapter" in str(err.value) and "gguf_chat (gguf)" in str(err.value)


def test_a_named_template_needs_its_repo():
    with pytest.raises(PermanentError, match="runs from the gguf repo, which this run did not publish"):
        choose_template("gguf_chat", "text-generation", {"merged"})


def test_unknown_template_fails_config_validation_listing_the_registered():
    with pytest.raises(ValueError, match="unknown Space template 'gguf_chta' .did you mean 'gguf_chat'") as err:
        SpaceSettings(template="gguf_chta")
    assert "registered: " in str(err.value)
    assert SpaceSettings().template == "auto" and SpaceSettings(template="gguf_chat").template == "gguf_chat"


def test_model_task_from_the_config():
    assert model_task({"architectures": ["LlamaForCausalLM"]}) == "text-generation"
    assert model_task({"architectures": ["WhisperForConditionalGeneration"]}) == "automatic-speech-recognition"
    assert model_task({"architectures": ["Wav2Vec2ForCTC"]}) == "automatic-speech-recognition"
    assert model_task({"architectures": ["LlamaForCausalLM"]}, "summarization") == "summarization"
    assert model_task(None) == "text-generation"


def test_a_broken_manifest_names_the_template_and_the_field(tmp_path):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "app.py").write_text("import os\n")
    (bad / "README.md.j2").write_text("---\n{{ space_header }}\n---\n")
    base = yaml.safe_load((SPACE_TEMPLATES["gguf_chat"].folder / "manifest.yaml").read_text())
    (bad / "manifest.yaml").write_text(yaml.safe_dump({**base, "variables": {"MODEL_REPO": "model_rep"}}))
    with pytest.raises(ValueError, match=r"(?s)Space template broken: .*manifest.yaml.*unknown inputs \['model_rep'\]"):
        load_template(bad)
    (bad / "manifest.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(ValueError, match=r"(?s)Space template broken: .*missing: \['requirements.txt'\]"):
        load_template(bad)
