"""The chat-template contract on real models: transformers, llama.cpp, Ollama's TEMPLATE in Go, LM Studio.

Real components throughout: the fixture models' HF tokenizers, their GGUFs read by llama.cpp (through
llama-cpp-python), llama-cpp-python's own chat formatter, the Go text/template engine (Debian's golang-go)
and, for the served generation, the project's llama-cpp-python server on loopback. The Ollama and LM Studio
apps cannot run here: what stands in for them is their prompt step (the Modelfile TEMPLATE rendered by Go
with Ollama's values, tokenized with the FROM GGUF's vocabulary; LM Studio's per-model config read from a
temporary LM Studio home, its Jinja override rendered by llama-cpp-python's formatter).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.chat.findings import Severity
from tasks.chat.stage import TemplateContractSettings, failure, template_contract
from tasks.local import lmstudio
from tasks.local.ollama import parse_modelfile
from tasks.local.stage import LocalDeploySettings, local_deploy
from tests.chat_helpers import merged_of, variant
from tests.deploy_helpers import gguf_artifacts

pytestmark = pytest.mark.slow

# A template of no known family: "### Role:" headers, the turn closed with <|im_end|> (a control token).
CUSTOM = (
    "{% for m in messages %}### {{ m['role'] | capitalize }}:\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)
# The same format as an Ollama TEMPLATE; BROKEN forgets the generation prompt.
CUSTOM_GO = (
    '{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}### {{ if eq .Role "user" }}User'
    '{{ else if eq .Role "system" }}System{{ else }}Assistant{{ end }}:\n{{ .Content }}'
    '{{ if or (not $last) (ne .Role "assistant") }}<|im_end|>\n{{ end }}'
    '{{ if and $last (ne .Role "assistant") }}### Assistant:\n{{ end }}{{ end }}'
)
CUSTOM_GO_BROKEN = CUSTOM_GO.replace("### Assistant:\n{{ end }}{{ end }}", "{{ end }}{{ end }}")
QUIET = TemplateContractSettings(served_generation=False)


def _deploy(tmp_path: Path, ggufs, **kw):
    settings = LocalDeploySettings(lmstudio_home=str(tmp_path / "lmstudio"), lms_path=None, **kw)
    return local_deploy(ggufs, settings, "demo", tmp_path / "publish")


def _report(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "reports" / "template-contract.json").read_text())


def _errors(rep: dict, check: str | None = None) -> list[dict]:
    return [f for f in rep["findings"] if f["severity"] == "error" and (check is None or f["check"] == check)]


def test_qwen2_gives_the_same_tokens_everywhere_and_the_served_model_stops(tmp_path, qwen2_base, qwen2_ggufs):
    ggufs = gguf_artifacts(qwen2_ggufs)
    local = _deploy(tmp_path, ggufs, system_prompt="Be brief.")
    settings = TemplateContractSettings(natural_stop="warn")  # a random tiny model's own answer may not stop
    art = template_contract(ggufs, merged_of(qwen2_base), local, settings, tmp_path / "reports")
    rep = _report(tmp_path)
    assert art.name == "report:template-contract" and art.kind == "report"
    assert art.meta["verdict"] in ("pass", "warn") and failure(art) is None, art.meta["errors"]
    assert art.meta["checked"] == ["transformers", "llama.cpp", "ollama", "lmstudio"]
    assert rep["family"]["name"] == "chatml" and rep["turn_end"]["piece"] == "<|im_end|>"
    for conv in rep["conversations"]:
        statuses = {rt: r["status"] for rt, r in conv["results"].items()}
        assert statuses == {"transformers": "reference", "llama.cpp": "same", "ollama": "same", "lmstudio": "same"}
    # the Modelfile SYSTEM and LM Studio's per-model system prompt reach the system-less conversation
    assert (
        "Be brief." in rep["prompts"]["no_system"]["ollama"] and "Be brief." in rep["prompts"]["no_system"]["lmstudio"]
    )
    assert "Be brief." not in rep["prompts"]["no_system"]["transformers"]
    forced = next(p for p in rep["generation"] if p["kind"] == "forced")
    assert forced["stopped"] and forced["completion_tokens"] == 0  # the server ends on <|im_end|> at once
    assert {p["kind"] for p in rep["generation"]} == {"forced", "natural"}
    md = (tmp_path / "reports" / "template-contract.md").read_text()
    assert "| system_user | ref, " in md and "`<\\|im_end\\|>`" in md  # pipes escaped inside table cells
    assert str(tmp_path) not in " ".join(art.meta["summary"])  # summary lines go into the card: no paths
    _check_card(ggufs, art, tmp_path)


def _check_card(ggufs, art, tmp_path: Path) -> None:
    """The model card's usage section: the format, the stop token, and the Modelfile that gives these tokens."""
    from tasks.publish.card import CardSettings, build_card

    text = build_card(
        ggufs,
        model_name="demo",
        version="v1",
        repo_id="alice/demo-GGUF",
        settings=CardSettings(),
        template_contract=art,
    )
    usage = text.split("### Chat format", 1)[1].split("### Python", 1)[0]
    assert "Format: ChatML." in usage and "ends with `<|im_end|>`" in usage
    assert "llama.cpp, ollama, lmstudio give the same tokens for 5 test conversations" in usage
    assert "FROM hf.co/alice/demo-GGUF:Q4_K_M" in usage and 'PARAMETER stop "<|im_end|>"' in usage
    assert art.meta["card"]["ollama_template"] in usage and str(tmp_path) not in text
    assert "### Chat format" not in build_card(
        ggufs, model_name="demo", version="v1", repo_id="alice/demo-GGUF", settings=CardSettings()
    )


def test_the_llama_fixture_differs_and_the_report_says_why(tmp_path, llama_base, llama_ggufs):
    """A real mismatch: a legacy=False SentencePiece tokenizer and a ChatML template without the BOS.

    llama.cpp puts a space before the text after a control token; Ollama's tokenizer adds a BOS the template
    does not write. Both are found, at the exact token, with their cause."""
    ggufs = gguf_artifacts(llama_ggufs)
    art = template_contract(ggufs, merged_of(llama_base), _deploy(tmp_path, ggufs), QUIET, tmp_path / "reports")
    rep = _report(tmp_path)
    assert art.meta["verdict"] == "fail" and art.meta["differences"] == 3 * len(rep["conversations"])
    first = next(d for d in rep["differences"] if d["runtime"] == "llama.cpp" and d["conversation"] == "system_user")
    assert first["index"] == 1 and first["before"] == [{"id": 3, "piece": "<|im_start|>"}]
    assert first["got"]["piece"].startswith("▁") and "space is added after a control token" in first["diagnosis"]
    olla = next(d for d in rep["differences"] if d["runtime"] == "ollama" and d["conversation"] == "system_user")
    assert olla["index"] == 0 and olla["got"]["piece"] == "<s>" and "extra BOS" in olla["diagnosis"]
    err = failure(art)
    assert err is not None and "system_user: llama.cpp differs from transformers at token 1" in str(err)
    assert "template-contract.md" in err.hint


def test_the_demo_model_agrees_everywhere(tmp_path, llama_chat_base, llama_chat_ggufs):
    """The same Llama with the fix the report names: legacy tokenizer, template that writes {{ bos_token }}."""
    ggufs = gguf_artifacts(llama_chat_ggufs)
    art = template_contract(ggufs, merged_of(llama_chat_base), _deploy(tmp_path, ggufs), QUIET, tmp_path / "reports")
    assert art.meta["verdict"] == "pass" and art.meta["differences"] == 0, art.meta["errors"]
    modelfile = parse_modelfile((tmp_path / "publish" / "ollama" / "Modelfile").read_text())
    assert not modelfile.template.startswith("<s>")  # the GGUF adds the BOS; the TEMPLATE must not write a second


def test_a_custom_template_leaves_ollama_to_choose_and_says_so(tmp_path, qwen2_base, qwen2_ggufs):
    merged, ggufs = variant(tmp_path, qwen2_base, qwen2_ggufs, CUSTOM)
    local = _deploy(tmp_path, ggufs, ollama_quant="Q4_K_M")
    assert parse_modelfile((tmp_path / "publish" / "ollama" / "Modelfile").read_text()).template is None
    art = template_contract(ggufs, merged, local, QUIET, tmp_path / "reports")
    rep = _report(tmp_path)
    assert art.meta["verdict"] == "warn" and rep["family"]["name"] is None
    assert "ollama" in art.meta["not_checked"] and "Ollama will choose" in art.meta["not_checked"]["ollama"]
    assert art.meta["checked"] == ["transformers", "llama.cpp", "lmstudio"] and not _errors(rep)


def test_a_missing_generation_prompt_in_the_ollama_template_is_caught(tmp_path, qwen2_base, qwen2_ggufs):
    merged, ggufs = variant(tmp_path, qwen2_base, qwen2_ggufs, CUSTOM)
    art = template_contract(
        ggufs, merged, _deploy(tmp_path / "bad", ggufs, ollama_template=CUSTOM_GO_BROKEN), QUIET, tmp_path / "r1"
    )
    assert art.meta["verdict"] == "fail"
    diffs = json.loads((tmp_path / "r1" / "template-contract.json").read_text())["differences"]
    assert {d["runtime"] for d in diffs} == {"ollama"}
    d = next(d for d in diffs if d["conversation"] == "system_user")
    assert d["got"] is None and d["index"] == d["tokens"] and "ends early" in d["diagnosis"]
    assert "Assistant" in d["diagnosis"]
    # the same custom format written correctly passes in every runtime, Ollama included
    good = template_contract(
        ggufs, merged, _deploy(tmp_path / "good", ggufs, ollama_template=CUSTOM_GO), QUIET, tmp_path / "r2"
    )
    assert good.meta["verdict"] == "pass" and "ollama" in good.meta["checked"], good.meta["errors"]


def test_a_wrong_stop_token_in_generation_config_is_caught(tmp_path, qwen2_base, qwen2_ggufs):
    """generation_config.json eos_token_id rewritten to <|endoftext|> (0): transformers would never stop a turn."""
    merged, ggufs = variant(tmp_path, qwen2_base, qwen2_ggufs, CUSTOM, eos_token_id=0)
    art = template_contract(ggufs, merged, _deploy(tmp_path, ggufs, ollama_template=CUSTOM_GO), QUIET, tmp_path / "r")
    stops = _errors(json.loads((tmp_path / "r" / "template-contract.json").read_text()), "stops")
    assert art.meta["verdict"] == "fail" and len(stops) == 1
    assert stops[0]["runtime"] == "transformers" and "generate() will not stop" in stops[0]["message"]
    assert "<|im_end|>" in stops[0]["message"]
    rep = json.loads((tmp_path / "r" / "template-contract.json").read_text())
    assert rep["gguf_tokens"]["eos"] == 2  # <|im_end|>: the GGUF kept it; only generation_config.json says 0


def test_an_end_of_turn_token_llama_cpp_does_not_stop_on_is_caught_by_the_served_model(
    tmp_path, qwen2_base, qwen2_ggufs
):
    """The turn ends with <|im_start|>: a control token, but not one llama.cpp ends generation on (as a new
    model's own end-of-turn token would be). The stop sets disagree, and the forced served generation runs to
    max_tokens. Ollama is covered only by a PARAMETER stop line."""
    ends_wrong = CUSTOM.replace("<|im_end|>", "<|im_start|>")
    go = CUSTOM_GO.replace("<|im_end|>", "<|im_start|>")
    merged, ggufs = variant(tmp_path, qwen2_base, qwen2_ggufs, ends_wrong)
    local = _deploy(tmp_path, ggufs, ollama_template=go, ollama_parameters={"stop": ["<|im_start|>"]})
    settings = TemplateContractSettings(natural_stop="off", serve_quant="F16")
    art = template_contract(ggufs, merged, local, settings, tmp_path / "r")
    rep = json.loads((tmp_path / "r" / "template-contract.json").read_text())
    assert rep["turn_end"]["piece"] == "<|im_start|>" and rep["turn_end"]["control"]
    failing = {f["runtime"] for f in _errors(rep, "stops")}
    assert failing == {"transformers", "llama.cpp", "lmstudio", "served"}  # ollama: its stop line covers it
    forced = rep["generation"][0]
    assert forced["kind"] == "forced" and forced["finish_reason"] == "length" and not forced["stopped"]
    assert any(f["check"] == "generation" for f in _errors(rep)) and art.meta["verdict"] == "fail"


def test_lm_studio_uses_an_override_from_its_per_model_config(tmp_path, qwen2_base, qwen2_ggufs):
    """LM Studio renders the GGUF's template unless its per-model config overrides it (set here by
    deployment.lmstudio_prompt_template, as the user would in the app); a wrong override is caught."""
    ggufs = gguf_artifacts(qwen2_ggufs)
    wrong = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    local = _deploy(tmp_path, ggufs, lmstudio_prompt_template=wrong)
    first = sorted(json.loads((tmp_path / "publish" / "lmstudio.json").read_text())["files"])[0]
    cfg_file = lmstudio.model_defaults_path((tmp_path / "lmstudio").resolve(), "loraship", "demo", first)
    value = next(
        f["value"]
        for f in json.loads(cfg_file.read_text())["operation"]["fields"]
        if f["key"].endswith("promptTemplate")
    )
    assert value["type"] == "jinja" and value["jinjaPromptTemplate"]["template"] == wrong
    art = template_contract(ggufs, merged_of(qwen2_base), local, QUIET, tmp_path / "r")
    rep = json.loads((tmp_path / "r" / "template-contract.json").read_text())
    assert art.meta["verdict"] == "fail" and {d["runtime"] for d in rep["differences"]} == {"lmstudio"}
    assert "Jinja override" in next(r["detail"] for r in rep["runtimes"] if r["name"] == "lmstudio")
    # the user removes the override in the app: the GGUF's template again, and the contract holds
    cfg = json.loads(cfg_file.read_text())
    cfg["operation"]["fields"] = [f for f in cfg["operation"]["fields"] if not f["key"].endswith("promptTemplate")]
    cfg_file.write_text(json.dumps(cfg))
    assert template_contract(ggufs, merged_of(qwen2_base), local, QUIET, tmp_path / "r").meta["verdict"] == "pass"


def test_without_a_merged_model_llama_cpp_is_the_reference(tmp_path, qwen2_ggufs):
    ggufs = gguf_artifacts(qwen2_ggufs)
    art = template_contract(ggufs, None, _deploy(tmp_path, ggufs), QUIET, tmp_path / "r")
    rep = json.loads((tmp_path / "r" / "template-contract.json").read_text())
    assert rep["reference"] == "llama.cpp" and art.meta["verdict"] == "warn"
    assert any(f["severity"] == Severity.WARNING.value and "transformers" in f["message"] for f in rep["findings"])


def test_settings_name_unknown_conversations_and_runtimes():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown conversation"):
        TemplateContractSettings(conversations=["nope"])
    with pytest.raises(ValidationError, match="runtimes: transformers, llama.cpp, ollama, lmstudio"):
        TemplateContractSettings(runtimes=["olama"])


def test_a_gguf_eos_none_of_transformers_stops_is_named():
    """The rewritten-EOS rule on its own: the GGUF's EOS/EOT against transformers' list."""
    from types import SimpleNamespace

    from tasks.chat.runtimes.base import StopSet
    from tasks.chat.stops import gguf_eos_agreement

    vocab = SimpleNamespace(eos_id=0, eot_id=None, piece=lambda i: {0: "<|endoftext|>"}[i])
    found = gguf_eos_agreement(vocab, StopSet(token_ids=(2,), source="generation_config.json eos_token_id"))
    assert len(found) == 1 and "'<|endoftext|>'(0)" in found[0].message and "changed the EOS" in found[0].message
    assert gguf_eos_agreement(vocab, StopSet(token_ids=(0, 2))) == []


def test_the_command_checks_a_finished_run_folder(tmp_path, llama_chat_base, llama_chat_ggufs):
    """`python -m tasks.chat RUN_DIR` reads the run's manifest and writes the report there; exit 0 on PASS."""
    import subprocess
    import sys

    from tasks.core.run import RunFolder

    run = RunFolder.for_model(tmp_path / "runs", "demo", "v1").ensure()
    ggufs = gguf_artifacts(llama_chat_ggufs)
    run.record("convert", "done", [merged_of(llama_chat_base), *ggufs])
    run.record("local_deploy", "done", _deploy(tmp_path, ggufs))
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.chat", str(run.root), "--no-serve"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "template contract: PASS" in proc.stdout and (run.reports_dir / "template-contract.md").is_file()
    missing = subprocess.run(
        [sys.executable, "-m", "tasks.chat", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "manifest.json does not exist" in missing.stderr
