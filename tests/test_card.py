"""Model card: rendered from the run's artifacts, YAML header from ModelCardData, validated locally and by the Hub."""

from __future__ import annotations

import pytest
import yaml
from pydantic import SecretStr

from tasks.core.errors import PermanentError
from tasks.publish.card import CardSettings, build_card, card, validate_card
from tests.hub_fixtures import adapter_artifact, eval_artifact, gguf_artifacts


def _header(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4 : text.index("\n---", 4)])


def test_card_with_training_and_eval(tmp_path):
    ggufs = gguf_artifacts(tmp_path / "g")
    adapter = adapter_artifact(tmp_path / "a", base="acme/tiny-base")
    ev = eval_artifact(
        tmp_path / "eval.json",
        {
            "Q4_K_M": {"ppl": 12.5, "kl_div": 0.05, "tokens_per_s": 300.0},
            "Q8_0": {"ppl": 11.9, "kl_div": 0.001},
            "F16": {"ppl": 11.8},
        },
    )
    text = build_card(
        ggufs,
        model_name="tiny",
        version="v1",
        repo_id="alice/tiny-GGUF",
        settings=CardSettings(license="mit", datasets=["acme/toy"]),
        adapter=adapter,
        eval_report=ev,
    )
    meta = _header(text)
    assert (
        meta["library_name"] == "gguf"
        and meta["base_model"] == "acme/tiny-base"
        and meta["base_model_relation"] == "quantized"
    )
    assert meta["license"] == "mit" and meta["language"] == ["en"] and meta["pipeline_tag"] == "text-generation"
    assert "gguf" in meta["tags"] and "Q4_K_M" in meta["tags"] and meta["datasets"] == ["acme/toy"]
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert {"type": "perplexity", "value": 12.5, "name": "perplexity (Q4_K_M)"} in metrics
    assert any(m["type"] == "kl_divergence" and m["value"] == 0.001 for m in metrics)
    # quant table: one row per file with size, sha256 and the eval columns
    assert "| file | type | size | bits per weight | sha256 | perplexity | KL divergence vs F16 | tokens/s |" in text
    row = next(line for line in text.splitlines() if line.startswith("| [tiny-Q4_K_M.gguf]"))
    assert ggufs[2].sha256[:16] in row and "| 12.5 | 0.05 | 300 |" in row
    assert "| LoRA r / alpha | 8 / 16 |" in text and "| steps | 60 |" in text and "2.5000 → 1.2500" in text
    for usage in ("### llama.cpp", "### LM Studio", "### Ollama", "### transformers", "hf.co/alice/tiny-GGUF:Q4_K_M"):
        assert usage in text
    assert "\n\n\n" not in text


def test_card_names_the_kl_reference_the_eval_used(tmp_path):
    """convert.outtype bf16: the eval's reference is the BF16 GGUF, and the card's columns say so."""
    ev = eval_artifact(tmp_path / "eval.json", {"Q4_K_M": {"ppl": 12.5, "kl_div": 0.05}, "BF16": {"ppl": 11.8}}, "BF16")
    text = build_card(
        gguf_artifacts(tmp_path / "g"),
        model_name="tiny",
        version="v1",
        repo_id="alice/tiny-GGUF",
        settings=CardSettings(),
        eval_report=ev,
    )
    assert "KL divergence vs BF16" in text and "vs F16" not in text
    assert any(
        m["name"] == "KL divergence vs BF16 (Q4_K_M)" for m in _header(text)["model-index"][0]["results"][0]["metrics"]
    )


def test_sections_without_data_are_left_out(tmp_path):
    ggufs = gguf_artifacts(tmp_path / "g", quants=("Q8_0",))
    text = build_card(
        ggufs,
        model_name="tiny",
        version="v1",
        repo_id="alice/tiny-GGUF",
        settings=CardSettings(),
        base_model="/some/local/folder",
    )
    meta = _header(text)
    assert "model-index" not in meta and "base_model" not in meta, "a local folder is not a Hub id"
    assert "| LoRA r" not in text and "| steps" not in text and "perplexity" not in text
    assert "tiny-Q8_0.gguf" in text
    bare = build_card(ggufs, model_name="tiny", version="v1", repo_id="alice/tiny-GGUF", settings=CardSettings())
    assert "## Training details" not in bare and "## Other files" not in bare


def test_user_text_cannot_break_the_yaml_header(tmp_path):
    ggufs = gguf_artifacts(tmp_path / "g", quants=("Q4_K_M",))
    evil = '---\nlicense: evil\ntags: [x]\n---\n"quotes" and: colons'
    text = build_card(
        ggufs,
        model_name="tiny",
        version="v1",
        repo_id="alice/tiny-GGUF",
        settings=CardSettings(description=evil, tags=["a: b", "--- c"]),
        description=evil,
    )
    meta = _header(text)
    assert meta["license"] == "apache-2.0"
    assert "a: b" in meta["tags"] and "--- c" in meta["tags"]
    assert evil in text  # the text is in the body, verbatim


def test_user_template_overrides_ours(tmp_path):
    ggufs = gguf_artifacts(tmp_path / "g", quants=("Q4_K_M",))
    tpl = tmp_path / "card.md.j2"
    tpl.write_text(
        "---\n{{ card_data }}\n---\n\n# {{ title }} by ACME\n\n{% for q in quants %}* {{ q.file }} {{ "
        "q.size_h }}\n{% endfor %}"
    )
    text = build_card(
        ggufs, model_name="tiny", version="v1", repo_id="alice/tiny-GGUF", settings=CardSettings(template=str(tpl))
    )
    assert "# tiny by ACME" in text and "* tiny-Q4_K_M.gguf" in text and "## Usage" not in text
    broken = tmp_path / "broken.md.j2"
    broken.write_text("---\nlicense: [unclosed\n---\n{{ title }}")
    with pytest.raises(PermanentError, match="YAML header"):
        build_card(
            ggufs,
            model_name="tiny",
            version="v1",
            repo_id="alice/tiny-GGUF",
            settings=CardSettings(template=str(broken)),
        )
    no_header = tmp_path / "noheader.md.j2"
    no_header.write_text("# {{ title }}")
    with pytest.raises(PermanentError, match="YAML header"):
        build_card(
            ggufs,
            model_name="tiny",
            version="v1",
            repo_id="alice/tiny-GGUF",
            settings=CardSettings(template=str(no_header)),
        )
    with pytest.raises(PermanentError, match="does not exist"):
        build_card(
            ggufs,
            model_name="tiny",
            version="v1",
            repo_id="alice/tiny-GGUF",
            settings=CardSettings(template=str(tmp_path / "missing.j2")),
        )


def test_card_validates_on_the_hub(tmp_path, hub_server):
    from tasks.publish.hub_io import hub_api, validate_card_remote

    ggufs = gguf_artifacts(tmp_path / "g")
    ev = eval_artifact(tmp_path / "eval.json", {"Q4_K_M": {"ppl": 12.5}})
    text = build_card(
        ggufs, model_name="tiny", version="v1", repo_id="alice/tiny-GGUF", settings=CardSettings(), eval_report=ev
    )
    api = hub_api(hub_server.url, "hf_write_alice")
    validate_card_remote(api, text, "hf_write_alice")
    assert hub_server.state.calls("POST", r"/api/validate-yaml")[-1].status == 200
    with pytest.raises(PermanentError, match="rejected the model card"):
        validate_card_remote(api, "---\nmodel-index: [{foo: 1}]\n---\n", "hf_write_alice")


def test_validate_card_catches_a_changed_header(tmp_path):
    from huggingface_hub import ModelCardData

    want = ModelCardData(library_name="gguf", license="mit", tags=["gguf"])
    ok = f"---\n{want.to_yaml()}\n---\nbody\n"
    validate_card(ok, want)
    with pytest.raises(PermanentError, match="license"):
        validate_card(ok.replace("license: mit", "license: other"), want)


def test_card_stage_updates_readme_after_eval(tmp_path, hub_server):
    """Run after a real push and an eval: the card gains the eval numbers and is committed alone."""
    from tasks.publish.hub_push import HubSettings, hub_push

    ggufs = gguf_artifacts(tmp_path / "g")
    pushed = hub_push(
        ggufs,
        HubSettings(endpoint=hub_server.url),
        CardSettings(),
        tmp_path / "publish",
        tmp_path / "reports",
        model_name="tiny",
        version="v1",
        token=SecretStr("hf_write_alice"),
    )
    repo = hub_server.state.repo("alice/tiny-GGUF")
    assert len(repo.commits) == 2
    out = tmp_path / "reports" / "README.md"
    same = card(
        ggufs,
        CardSettings(),
        out,
        model_name="tiny",
        version="v1",
        repo_id="alice/tiny-GGUF",
        pushed=pushed,
        endpoint=hub_server.url,
        token=SecretStr("hf_write_alice"),
    )
    assert "commit" in same.meta and same.meta["commit"] is None and len(repo.commits) == 2, (
        "an unchanged card sends nothing"
    )
    ev = eval_artifact(tmp_path / "eval.json", {"Q4_K_M": {"ppl": 12.5, "kl_div": 0.05}})
    art = card(
        ggufs,
        CardSettings(),
        out,
        model_name="tiny",
        version="v1",
        repo_id="alice/tiny-GGUF",
        eval_report=ev,
        pushed=pushed,
        endpoint=hub_server.url,
        token=SecretStr("hf_write_alice"),
    )
    assert art.meta["has_eval"] and art.meta["commit"] == repo.head.oid and len(repo.commits) == 3
    assert set(repo.commits[-1].files) == set(repo.commits[-2].files)
    assert hub_server.state.blob(repo.files()["README.md"].sha256).decode() == out.read_text()
    assert "model-index" in out.read_text()
