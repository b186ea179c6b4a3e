"""The chat-template families table: detection by rendered structure, and each row's Ollama template.

Fixtures (tests/fixtures/chat_templates/) are each family's template text, written from the family's
documented format as it appears in tokenizer_config.json / the GGUF (index.json gives the BOS/EOS texts the
template is rendered with). Templates are rendered by transformers' own renderer; the Ollama templates by the
real Go text/template engine through the project's Go program (Debian's golang-go, built into the cache).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tasks.chat import gorender
from tasks.chat.conversations import CONVERSATIONS, Conversation, Ending, Message
from tasks.chat.families import BY_NAME, FAMILIES, SystemPlacement, detect, ollama_template
from tasks.chat.jinja import TemplateRefused, render_jinja

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
INDEX: dict[str, dict] = json.loads((FIXTURES / "index.json").read_text())


def _template(name: str) -> str:
    return (FIXTURES / name).read_text()


def _hf(template: str, conv: Conversation, info: dict, continued: bool = False) -> str | None:
    """transformers' rendering: with the generation prompt, or the final assistant message left open."""
    from transformers.utils.chat_template_utils import render_jinja_template

    kw = {"continue_final_message": True} if continued else {"add_generation_prompt": conv.add_generation_prompt}
    try:
        return render_jinja_template(
            conversations=[conv.as_dicts()], chat_template=template, bos_token=info["bos"], eos_token=info["eos"], **kw
        )[0][0]
    except Exception as exc:  # the template refuses the conversation (no system role, roles must alternate)
        assert "support" in str(exc) or "alternate" in str(exc), exc
        return None


@pytest.mark.parametrize("fixture", sorted(INDEX))
def test_each_family_template_is_detected_by_its_structure(fixture):
    info = INDEX[fixture]
    found = detect(_template(fixture), info["bos"], info["eos"])
    assert found.name == info["family"], found.reason
    assert found.default_system == info.get("default_system")


def test_every_family_row_has_a_real_template_fixture():
    assert {i["family"] for i in INDEX.values()} == set(BY_NAME)
    for fam in FAMILIES:
        assert fam.stop and fam.title and fam.used_by and "{{" in fam.ollama


@pytest.fixture(scope="module")
def go_renderer() -> Path:
    """The Go program, built with Debian's golang-go into the loraship cache (once; a few seconds cold)."""
    return gorender.binary()


@pytest.mark.parametrize("fixture", sorted(INDEX))
def test_ollama_template_renders_what_transformers_renders(fixture, go_renderer):
    """Go text/template with Ollama's values gives the family template's text for every fixed conversation.

    Ollama's tokenizer adds the BOS (add_bos_token), so the Go text is compared without the leading BOS; a
    conversation ending on the assistant is continued by Ollama, so it is compared with continue_final_message.
    """
    info = INDEX[fixture]
    template = _template(fixture)
    found = detect(template, info["bos"], info["eos"])
    translated = ollama_template(found, add_bos=True)
    assert translated is not None
    messages = []
    for c in CONVERSATIONS:  # Ollama puts the Modelfile SYSTEM (the template's default) first when there is none
        m = c.as_dicts()
        messages.append(
            ([{"role": "system", "content": translated.system}] if translated.system and not c.has_system else []) + m
        )
    rendered = gorender.render(translated.template, messages)
    compared = 0
    for conv, got in zip(CONVERSATIONS, rendered):
        want = _hf(template, conv, info, continued=conv.ending is Ending.CLOSED)
        if want is None:
            continue
        bos = found.family.bos or found.leading_bos
        assert want.startswith(bos)
        assert got.error is None and got.prompt == want[len(bos) :], (conv.name, got.prompt, want)
        compared += 1
    assert compared >= 2


@pytest.mark.parametrize("fixture", ["llama3.jinja", "gemma3.jinja"])
def test_a_gguf_without_add_bos_gets_the_bos_written_in_the_template(fixture, go_renderer):
    info = INDEX[fixture]
    found = detect(_template(fixture), info["bos"], info["eos"])
    translated = ollama_template(found, add_bos=False)
    assert translated.template.startswith(info["bos"]) and "does not add a BOS" in translated.notes[0]
    got = gorender.render(translated.template, [CONVERSATIONS[0].as_dicts()])[0].prompt
    assert got == _hf(_template(fixture), CONVERSATIONS[0], info)


def test_family_rows_render_their_own_fixture():
    """The canonical rendering of a row is the detection rule: it equals the real template on the fixed set."""
    for fixture, info in INDEX.items():
        fam = BY_NAME[info["family"]]
        for conv in CONVERSATIONS:
            want = _hf(_template(fixture), conv, info)
            default = info.get("default_system") if not conv.has_system else None
            if want is None:
                with pytest.raises(TemplateRefused):
                    fam.render(conv.messages, conv.ending, default)
                assert fam.system is SystemPlacement.UNSUPPORTED or conv.name == "no_system"
                continue
            assert fam.render(conv.messages, conv.ending, default) == want, (fixture, conv.name)


# --- structure, not substrings ----------------------------------------------------------------------------

CHATML = _template("chatml.jinja")


def test_a_template_that_only_mentions_the_markers_is_not_that_family():
    # ChatML markers in a branch that never runs: the rendering is an Alpaca-style prompt
    template = (
        "{% if false %}<|im_start|>{% endif %}{% for m in messages %}### {{ m['role'] | capitalize }}:\n"
        "{{ m['content'] }}\n\n{% endfor %}{% if add_generation_prompt %}### Assistant:\n{% endif %}"
    )
    assert "<|im_start|>" in template
    found = detect(template, "", "<|im_end|>")
    assert found.family is None and "chatml" in found.reason
    assert ollama_template(found, add_bos=False) is None  # TEMPLATE left to Ollama


def test_chatml_with_a_missing_newline_is_not_chatml():
    broken = CHATML.replace("message['role'] + '\\n'", "message['role'] + ' '")
    assert broken != CHATML
    assert detect(broken, "", "<|im_end|>").family is None


def test_chatml_after_a_bos_is_chatml_with_the_bos_handled():
    found = detect("{{ bos_token }}" + CHATML, "<s>", "</s>")
    assert found.name == "chatml" and found.leading_bos == "<s>"
    assert ollama_template(found, add_bos=True).template == BY_NAME["chatml"].ollama  # the tokenizer adds it
    assert ollama_template(found, add_bos=False).template.startswith("<s>")
    plain = detect(CHATML, "<s>", "</s>")
    notes = ollama_template(plain, add_bos=True).notes
    assert plain.leading_bos == "" and "writes none" in notes[0]  # Ollama would add a BOS the template lacks


def test_a_default_system_prompt_is_read_off_the_rendering():
    found = detect(_template("qwen2.5.jinja"), "", "<|im_end|>")
    assert found.name == "chatml" and found.default_system.startswith("You are Qwen")
    assert ollama_template(found, add_bos=False).system == found.default_system  # becomes the Modelfile SYSTEM


def test_no_template_and_a_broken_template():
    assert detect(None).family is None and "no chat template" in detect(None).reason
    found = detect("{% for m in messages %}{{ m.content }", "", "")
    assert found.family is None and "does not render" in found.reason


# --- the Go renderer ---------------------------------------------------------------------------------------


def test_go_renderer_follows_ollamas_legacy_and_messages_forms(go_renderer):
    legacy = (
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}<|im_start|>user\n"
        "{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"
    )
    conv = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1 {{ .Prompt }}"},  # template syntax in a message stays text
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ]
    out = gorender.render(legacy, [conv])[0].prompt
    # one execution per exchange; the last one cut at {{ .Response }} (the reply is generated from there)
    assert out == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1 {{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n"
        "A1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n"
    )
    two_systems = [
        {"role": "system", "content": "a"},
        {"role": "system", "content": "b"},
        {"role": "user", "content": "u"},
    ]
    out = gorender.render("[{{ .System }}]{{ range .Messages }}<{{ .Role }}:{{ .Content }}>{{ end }}", [two_systems])
    assert out[0].prompt == "[a\n\nb]<system:a\n\nb><user:u>"  # collated: systems joined, same roles merged
    assert (
        gorender.render("{{ .Prompt }}", [[{"role": "user", "content": "hi"}]])[0].prompt == "hi"
    )  # + {{ .Response }}


def test_go_renderer_reports_template_errors(go_renderer):
    from tasks.core.errors import PermanentError

    with pytest.raises(PermanentError, match="does not parse"):
        gorender.render("{{ range .Messages }}", [[{"role": "user", "content": "x"}]])
    out = gorender.render("{{ .Messages.Nope }}", [[{"role": "user", "content": "x"}]])
    assert out[0].prompt is None and "Nope" in out[0].error


def test_without_go_the_renderer_says_what_to_install(tmp_path, monkeypatch):
    """A machine without Go and without a built renderer: a clear GoUnavailable, nothing half-built."""
    monkeypatch.setenv("LORASHIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv(gorender.GO_ENV, str(tmp_path / "no-go"))
    monkeypatch.setattr(gorender, "_GO_CANDIDATES", ())
    with pytest.raises(gorender.GoUnavailable) as err:
        gorender.binary()
    assert "golang-go" in str(err.value) and not (tmp_path / "cache" / "go").exists()


def test_the_renderer_is_built_once_into_the_cache_with_no_network(tmp_path, monkeypatch):
    go = shutil.which("go") or gorender.find_go()
    assert go, "golang-go is part of ./setup.sh --test"
    env = gorender.go_env()
    root = str(gorender.cache_root() / "go")
    assert env["GOPROXY"] == "off" and env["GOTOOLCHAIN"] == "local" and env["CGO_ENABLED"] == "0"
    assert env["GOCACHE"].startswith(root) and env["GOPATH"].startswith(root)
    # a fresh binary folder (Go's own build cache stays the shared one, so this takes seconds, not a cold build)
    monkeypatch.setattr(gorender, "build_dir", lambda: tmp_path / "ollama-render-test")
    exe = gorender.binary()
    assert exe.is_file() and os.access(exe, os.X_OK) and exe.parent == tmp_path / "ollama-render-test"
    assert "go1." in (gorender.go_version() or "")
    mtime = exe.stat().st_mtime_ns
    assert gorender.binary() == exe and exe.stat().st_mtime_ns == mtime  # the second call builds nothing
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["ollama-render-test"]


def test_conversations_cover_the_issue_cases():
    names = {c.name for c in CONVERSATIONS}
    assert {"system_user", "multi_turn", "closed_exchange", "template_like_text"} <= names
    assert any(c.ending is Ending.CLOSED for c in CONVERSATIONS) and any(c.add_generation_prompt for c in CONVERSATIONS)
    like = next(c for c in CONVERSATIONS if c.name == "template_like_text").messages[0].content
    assert "{{ .Prompt }}" in like and "{%" in like and "<|im_start|>" in like
    with_sys = CONVERSATIONS[2].with_default_system("D")
    assert (
        with_sys.messages[0] == Message(role="system", content="D")
        and CONVERSATIONS[0].with_default_system("D") == CONVERSATIONS[0]
    )
    assert render_jinja(CHATML, CONVERSATIONS[0].as_dicts(), True).endswith("<|im_start|>assistant\n")
