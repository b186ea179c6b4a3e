"""Cache keys cover what changes a stage's results besides its code and input artifacts: the versions of
the tools doing the work (llama.cpp via llama-cpp-python, transformers, peft, torch, gguf,
huggingface_hub), the template files a stage renders, and the contents behind path settings (imatrix,
card.template, eval samples and held-out text, compare_gguf, a llama_cpp_dir checkout's commit).

Keys are computed by the real cache policy (tasks/core/caching.py) for the real stage tasks."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from pydantic import SecretStr

from tasks.core import artifacts as artifacts_module
from tasks.core.caching import artifacts_policy
from tasks.core.constants import PROJECT_ROOT, TEMPLATES_DIR
from tests.hub_fixtures import gguf_artifacts


def key(task, **inputs) -> str:
    return artifacts_policy().compute_key(SimpleNamespace(task=task, result_store=None), inputs, {})


@pytest.fixture
def fake_version(monkeypatch):
    """Pretend a distribution is installed at another version (what an upgrade looks like to the key)."""
    real = artifacts_module._version.__wrapped__
    versions: dict[str, str] = {}

    def version(dist: str):
        return versions.get(dist) or real(dist)

    monkeypatch.setattr(artifacts_module, "_version", version)
    return versions


@pytest.mark.parametrize("dist", ["llama-cpp-python", "transformers", "peft", "torch", "gguf", "huggingface_hub"])
def test_a_tool_upgrade_invalidates_the_stages(tmp_path, fake_version, dist):
    from tasks.gguf.convert import ConvertSettings, convert_task

    (f16,) = gguf_artifacts(tmp_path, quants=("F16",))
    inputs = dict(merged=f16, settings=ConvertSettings(), out_dir=tmp_path, model_name="m")
    before = key(convert_task, **inputs)
    assert key(convert_task, **inputs) == before
    fake_version[dist] = "999.0.0"
    assert key(convert_task, **inputs) != before


def test_the_stages_declare_the_templates_they_render():
    from tasks.local.stage import local_deploy_task
    from tasks.publish.card import card_task
    from tasks.publish.hub_push import hub_push_task
    from tasks.publish.space import space_task

    def files(task) -> set[str]:
        return {Path(p).relative_to(TEMPLATES_DIR).as_posix() for p in task.fn.__loraship_key_files__}

    assert "model_card.md.j2" in files(card_task) and "model_card.md.j2" in files(hub_push_task)
    assert {"spaces/gguf_chat/README.md.j2", "spaces/gguf_chat/app.py", "spaces/gguf_chat/requirements.txt"} <= files(
        space_task
    )
    assert "ollama/Modelfile.j2" in files(local_deploy_task)


def test_a_changed_template_invalidates_the_stage_that_renders_it(tmp_path, monkeypatch):
    from tasks.publish.card import CardSettings, card_task

    template = tmp_path / "card.md.j2"
    template.write_text((TEMPLATES_DIR / "model_card.md.j2").read_text())
    ggufs = gguf_artifacts(tmp_path / "g")
    inputs = dict(
        ggufs=ggufs, settings=CardSettings(template=str(template)), out_path=tmp_path / "README.md", model_name="m"
    )
    before = key(card_task, **inputs)
    template.write_text(template.read_text() + "\nA new line at the end.\n")  # same path, new content
    assert key(card_task, **inputs) != before

    # the built-in template: the task's declared template files are part of the key
    builtin = dict(inputs, settings=CardSettings())
    base = key(card_task, **builtin)
    copy = tmp_path / "model_card.md.j2"
    copy.write_text("changed")
    monkeypatch.setattr(card_task.fn, "__loraship_key_files__", (copy,))
    assert key(card_task, **builtin) != base


def test_path_settings_are_keyed_by_their_contents(tmp_path):
    from tasks.evaluate.evaluation import EvalSettings, evaluate_task
    from tasks.gguf.quantize import QuantizeSettings, quantize_task

    (f16,) = gguf_artifacts(tmp_path / "g", quants=("F16",))
    imatrix = tmp_path / "imatrix.gguf"
    imatrix.write_bytes(b"one")
    q = dict(f16=f16, quant="Q4_K_M", settings=QuantizeSettings(imatrix=str(imatrix)), out_dir=tmp_path, model_name="m")
    before = key(quantize_task, **q)
    imatrix.write_bytes(b"two")
    assert key(quantize_task, **q) != before

    samples, heldout, compare = tmp_path / "s.jsonl", tmp_path / "h.txt", tmp_path / "other.gguf"
    samples.write_text('{"prompt": "a", "reference": "b"}\n')
    heldout.write_text("some text")
    compare.write_bytes(b"gguf one")
    s = EvalSettings(samples=str(samples), heldout_text=str(heldout), compare_gguf=str(compare))
    e = dict(ggufs=[f16], settings=s, out_dir=tmp_path / "eval", model_name="m")
    before = key(evaluate_task, **e)
    for path, new in ((samples, '{"prompt": "a", "reference": "c"}\n'), (heldout, "other"), (compare, "gguf two")):
        path.write_text(new)
        after = key(evaluate_task, **e)
        assert after != before, path.name
        before = after


def test_a_llama_cpp_checkout_is_keyed_by_its_commit(tmp_path):
    from tasks.gguf.convert import ConvertSettings, convert_task

    repo = tmp_path / "llama.cpp"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "convert_hf_to_gguf.py").write_text("# one\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    (f16,) = gguf_artifacts(tmp_path / "g", quants=("F16",))
    c = dict(merged=f16, settings=ConvertSettings(llama_cpp_dir=str(repo)), out_dir=tmp_path, model_name="m")
    before = key(convert_task, **c)
    (repo / "convert_hf_to_gguf.py").write_text("# two\n")
    subprocess.run([*git, "commit", "-qam", "two"], check=True)
    assert key(convert_task, **c) != before


def test_a_rotated_secret_changes_the_key_without_being_in_it(tmp_path):
    from tasks.publish.space import SpaceSettings, space_task

    (g,) = gguf_artifacts(tmp_path / "g", quants=("Q4_K_M",))
    base = dict(pushed=g, ggufs=[g], settings=SpaceSettings(), publish_dir=tmp_path, model_name="m")
    a = key(space_task, **base, _read_token=SecretStr("hf_read_one"))
    assert a == key(space_task, **base, _read_token=SecretStr("hf_read_one"))
    assert a != key(space_task, **base, _read_token=SecretStr("hf_read_two"))
    assert a != key(space_task, **base, _read_token=None)


def test_the_nightly_deployment_measures_again():
    spec = yaml.safe_load((PROJECT_ROOT / "deployments" / "prefect.yaml").read_text())
    nightly = next(d for d in spec["deployments"] if d["name"] == "loraship-nightly-health")
    assert set(nightly["parameters"]["refresh"]) >= {"serve", "health", "evaluate"}
