"""Chat-template families: one row each, with the structure that detects it, its Ollama TEMPLATE and stops.

A GGUF carries a Jinja chat template; Ollama wants a Go template. Matching the Jinja text by a substring
(`"<|im_start|>" in template`) mistakes a template that merely mentions a marker, or one that renders
differently around it (a default system prompt, a missing newline, the system text moved into the user
turn), for the family. So a row describes the *rendered structure*: the BOS text the template writes
first, what it writes before and after each role's content, where the system prompt goes, the generation
prompt. `detect` renders a set of probe conversations with the candidate template (transformers' own
renderer) and with each row, and a row matches only when every probe renders to the same text. A
template-supplied default system prompt (Qwen2.5's) is read off the render and handed to Ollama as the
Modelfile's SYSTEM.

Each row's `ollama` is a Go template in Ollama's `.Messages` form, without the leading BOS (Ollama's
tokenizer adds it when the GGUF asks for one; `ollama_template` writes it as text when the GGUF does not).
A final assistant message is left open, as Ollama continues it (prefill). `tests/test_chat_families.py`
renders every row's Go template with the real Go engine against its canonical rendering and against a
real template of the family. Adding a family is one row here plus one fixture template in tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from tasks.chat.conversations import Conversation, Ending, Message
from tasks.chat.jinja import TemplateRefused, render_jinja


class SystemPlacement(StrEnum):
    """Where a family writes the system prompt."""

    #: a turn of its own, in place (wrapped in `system_wrap`)
    TURN = "turn"
    #: the leading system message inside the first user turn, before its text
    FIRST_USER = "first_user"
    #: the leading system message inside the last user turn, only when the conversation ends on it (Mistral v3)
    LAST_USER = "last_user"
    #: every system message's text, joined by a blank line, right after the BOS, unwrapped (DeepSeek)
    PREAMBLE = "preamble"
    #: the template refuses a system message (raise_exception)
    UNSUPPORTED = "unsupported"


@dataclass(frozen=True)
class Wrap:
    before: str
    after: str


@dataclass(frozen=True)
class Family:
    """One chat format: how it renders (the detection rule), its Ollama template, its stop strings."""

    name: str
    title: str
    used_by: str
    bos: str
    user: Wrap
    assistant: Wrap
    generation: str
    system: SystemPlacement
    ollama: str
    stop: tuple[str, ...]
    system_wrap: Wrap = Wrap("", "")
    #: the system turn is written even when there is no system message (empty text): Llama 3.1's date block
    system_always: bool = False
    #: the BOS text is written again before every later user turn (Llama 2)
    bos_each_user: bool = False
    #: written at the very end when no generation prompt is asked for (Phi-3 writes the EOS text)
    closed_end: str = ""

    def render(self, messages: Sequence[Message], ending: Ending, default_system: str | None = None) -> str:
        """The text this family makes of `messages` (REPLY: with the generation prompt; CLOSED: closed).

        Raises TemplateRefused where the family's templates raise (a system message for UNSUPPORTED).
        """
        return self._render(list(messages), ending, default_system)

    def render_continued(self, messages: Sequence[Message]) -> str:
        """The final assistant message left open to be continued (transformers' continue_final_message)."""
        text = self._render(list(messages), Ending.CLOSED, None)
        tail = self.assistant.after + self.closed_end
        return text[: len(text) - len(tail)] if tail and text.endswith(tail) else text

    def _render(self, msgs: list[Message], ending: Ending, default_system: str | None) -> str:
        systems = [m.content for m in msgs if m.role == "system"]
        if not systems and default_system is not None:
            msgs = [Message(role="system", content=default_system), *msgs]
            systems = [default_system]
        if systems and self.system is SystemPlacement.UNSUPPORTED:
            raise TemplateRefused(f"{self.title} templates do not support a system message")
        leading = msgs[0].content if msgs and msgs[0].role == "system" else None
        out = [self.bos]
        body = msgs
        if self.system is SystemPlacement.TURN:
            if self.system_always and leading is None:
                out.append(self.system_wrap.before + self.system_wrap.after)
        elif self.system is SystemPlacement.PREAMBLE:
            out.append("\n\n".join(systems))
            body = [m for m in msgs if m.role != "system"]
        else:
            body = msgs[1:] if leading is not None else msgs
        users = [i for i, m in enumerate(body) if m.role == "user"]
        for i, m in enumerate(body):
            if m.role == "system":
                out.append(self.system_wrap.before + m.content + self.system_wrap.after)
                continue
            wrap = self.user if m.role == "user" else self.assistant
            content = m.content
            if m.role == "user" and leading is not None:
                first, last = users[0] == i, users[-1] == i == len(body) - 1
                if (self.system is SystemPlacement.FIRST_USER and first) or (
                    self.system is SystemPlacement.LAST_USER and last
                ):
                    content = self.system_wrap.before + leading + self.system_wrap.after + content
            if m.role == "user" and self.bos_each_user and users[0] != i:
                out.append(self.bos)
            out.append(wrap.before + content + wrap.after)
        out.append(self.generation if ending is Ending.REPLY else self.closed_end)
        return "".join(out)


# --- the Ollama templates --------------------------------------------------------------------------------
# Written without whitespace-trimming markers, so every newline is one the format has. `$last` is the last
# message; after it comes the generation prompt (a user message last) or nothing (an assistant message last is
# left open: Ollama continues it).

_LAST = "{{ $last := eq (len (slice $.Messages $i)) 1 }}"


def _turns(before: str, after: str, generation: str) -> str:
    """A TURN family: every message, system included, as `before{role}...content after`."""
    return (
        "{{ range $i, $m := .Messages }}" + _LAST + before + "{{ .Content }}"
        '{{ if or (not $last) (ne .Role "assistant") }}' + after + "{{ end }}"
        '{{ if and $last (ne .Role "assistant") }}' + generation + "{{ end }}"
        "{{ end }}"
    )


def _by_role(user: Wrap, assistant: Wrap, generation: str, system_first: str = "", system_last: str = "") -> str:
    """A family without system turns: user and assistant wraps; the system text goes into a user turn.

    `system_first` ("{sys}" placeholder) is written inside the first user turn, `system_last` inside the user
    turn that ends the conversation; system messages themselves are skipped.
    """
    first = ("{{ if $sys }}" + system_first.replace("{sys}", "{{ $sys }}") + '{{ $sys = "" }}{{ end }}') * bool(
        system_first
    )
    last = ("{{ if and $.System $last }}" + system_last.replace("{sys}", "{{ $.System }}") + "{{ end }}") * bool(
        system_last
    )
    return (
        "{{ $sys := .System }}{{ range $i, $m := .Messages }}" + _LAST + '{{ if eq .Role "user" }}' + user.before
        + first + last + "{{ .Content }}" + user.after + "{{ if $last }}" + generation + "{{ end }}"
        '{{ else if eq .Role "assistant" }}' + assistant.before + "{{ .Content }}"
        "{{ if not $last }}" + assistant.after + "{{ end }}{{ end }}{{ end }}"
    )  # fmt: skip


_LLAMA31_PREAMBLE = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
_DS_BOS, _DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
_DS_USER, _DS_ASSISTANT = "<｜User｜>", "<｜Assistant｜>"


def _chatml_like(start: str, sep: str, end: str, stop: tuple[str, ...]) -> dict:
    return dict(
        bos="",
        system=SystemPlacement.TURN,
        system_wrap=Wrap(f"{start}system{sep}", end),
        user=Wrap(f"{start}user{sep}", end),
        assistant=Wrap(f"{start}assistant{sep}", end),
        generation=f"{start}assistant{sep}",
        ollama=_turns(start + "{{ .Role }}" + sep, end, f"{start}assistant{sep}"),
        stop=stop,
    )


def _header_turns(preamble: str = "") -> dict:
    head = "<|start_header_id|>{role}<|end_header_id|>\n\n"
    return dict(
        bos="<|begin_of_text|>",
        system=SystemPlacement.TURN,
        system_wrap=Wrap(head.format(role="system") + preamble, "<|eot_id|>"),
        user=Wrap(head.format(role="user"), "<|eot_id|>"),
        assistant=Wrap(head.format(role="assistant"), "<|eot_id|>"),
        generation=head.format(role="assistant"),
        stop=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    )


_GEMMA = dict(
    bos="<bos>",
    user=Wrap("<start_of_turn>user\n", "<end_of_turn>\n"),
    assistant=Wrap("<start_of_turn>model\n", "<end_of_turn>\n"),
    generation="<start_of_turn>model\n",
    system_wrap=Wrap("", "\n\n"),
    ollama=_by_role(
        Wrap("<start_of_turn>user\n", "<end_of_turn>\n"),
        Wrap("<start_of_turn>model\n", "<end_of_turn>\n"),
        "<start_of_turn>model\n",
        system_first="{sys}\n\n",
    ),
    stop=("<start_of_turn>", "<end_of_turn>"),
)

_DEEPSEEK = dict(
    bos=_DS_BOS,
    system=SystemPlacement.PREAMBLE,
    user=Wrap(_DS_USER, ""),
    assistant=Wrap(_DS_ASSISTANT, _DS_EOS),
    stop=(_DS_BOS, _DS_EOS, _DS_USER, _DS_ASSISTANT),
)

#: The table. Order matters only for the report's "closest family" when nothing matches.
FAMILIES: tuple[Family, ...] = (
    Family(
        name="chatml",
        title="ChatML",
        used_by="Qwen 1.5-2.5, Hermes, SmolLM, Yi, many fine-tunes",
        **_chatml_like("<|im_start|>", "\n", "<|im_end|>\n", ("<|im_start|>", "<|im_end|>")),
    ),
    Family(
        name="llama3",
        title="Llama 3",
        used_by="Meta Llama 3 Instruct",
        ollama=_turns(
            "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n",
            "<|eot_id|>",
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        **_header_turns(),
    ),
    Family(
        name="llama3.1",
        title="Llama 3.1 (system block with the knowledge-cutoff date)",
        used_by="Meta Llama 3.1 Instruct without tools",
        system_always=True,
        ollama=(
            "<|start_header_id|>system<|end_header_id|>\n\n" + _LLAMA31_PREAMBLE + "{{ .System }}<|eot_id|>"
            "{{ range $i, $m := .Messages }}" + _LAST + '{{ if ne .Role "system" }}'
            "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}"
            '{{ if or (not $last) (ne .Role "assistant") }}<|eot_id|>{{ end }}'
            '{{ if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}'
            "{{ end }}{{ end }}"
        ),
        **_header_turns(_LLAMA31_PREAMBLE),
    ),
    Family(
        name="llama2",
        title="Llama 2 chat ([INST] with <<SYS>>)",
        used_by="Llama 2 Chat, CodeLlama Instruct",
        bos="<s>",
        bos_each_user=True,
        system=SystemPlacement.FIRST_USER,
        system_wrap=Wrap("<<SYS>>\n", "\n<</SYS>>\n\n"),
        user=Wrap("[INST] ", " [/INST]"),
        assistant=Wrap(" ", " </s>"),
        generation="",
        ollama=(
            "{{ $sys := .System }}{{ $first := true }}{{ range $i, $m := .Messages }}"
            + _LAST
            + '{{ if eq .Role "user" }}{{ if not $first }}<s>{{ end }}{{ $first = false }}[INST] '
            '{{ if $sys }}<<SYS>>\n{{ $sys }}\n<</SYS>>\n\n{{ $sys = "" }}{{ end }}{{ .Content }} [/INST]'
            '{{ else if eq .Role "assistant" }} {{ .Content }}{{ if not $last }} </s>{{ end }}{{ end }}{{ end }}'
        ),  # fmt: skip
        stop=("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"),
    ),
    Family(
        name="mistral",
        title="Mistral [INST] (v0.1/v0.2: ' [/INST]', no system role)",
        used_by="Mistral 7B Instruct v0.1/v0.2, Mixtral 8x7B Instruct",
        bos="<s>",
        system=SystemPlacement.UNSUPPORTED,
        system_wrap=Wrap("", "\n\n"),
        user=Wrap("[INST] ", " [/INST]"),
        assistant=Wrap("", "</s>"),
        generation="",
        ollama=_by_role(Wrap("[INST] ", " [/INST]"), Wrap("", "</s>"), "", system_first="{sys}\n\n"),
        stop=("[INST]", "[/INST]"),
    ),
    Family(
        name="mistral-v3",
        title="Mistral [INST] v3 ('[/INST]', system text in the last user turn)",
        used_by="Mistral 7B Instruct v0.3, Mistral Nemo, Mixtral 8x22B Instruct",
        bos="<s>",
        system=SystemPlacement.LAST_USER,
        system_wrap=Wrap("", "\n\n"),
        user=Wrap("[INST] ", "[/INST]"),
        assistant=Wrap(" ", "</s>"),
        generation="",
        ollama=_by_role(Wrap("[INST] ", "[/INST]"), Wrap(" ", "</s>"), "", system_last="{sys}\n\n"),
        stop=("[INST]", "[/INST]"),
    ),
    Family(
        name="gemma",
        title="Gemma 1/2 (no system role)",
        used_by="Gemma, Gemma 2 instruction-tuned",
        system=SystemPlacement.UNSUPPORTED,
        **_GEMMA,
    ),
    Family(
        name="gemma3",
        title="Gemma 3 (system text in the first user turn)",
        used_by="Gemma 3 instruction-tuned",
        system=SystemPlacement.FIRST_USER,
        **_GEMMA,
    ),
    Family(
        name="phi3",
        title="Phi-3 (<|user|> ... <|end|>)",
        used_by="Phi-3, Phi-3.5 mini/medium instruct",
        bos="",
        system=SystemPlacement.TURN,
        system_wrap=Wrap("<|system|>\n", "<|end|>\n"),
        user=Wrap("<|user|>\n", "<|end|>\n"),
        assistant=Wrap("<|assistant|>\n", "<|end|>\n"),
        generation="<|assistant|>\n",
        closed_end="<|endoftext|>",
        ollama=_turns("<|{{ .Role }}|>\n", "<|end|>\n", "<|assistant|>\n"),
        stop=("<|end|>", "<|user|>", "<|assistant|>"),
    ),
    Family(
        name="phi4",
        title="Phi-4 (<|im_start|>role<|im_sep|>)",
        used_by="Phi-4",
        **_chatml_like("<|im_start|>", "<|im_sep|>", "<|im_end|>", ("<|im_start|>", "<|im_end|>", "<|im_sep|>")),
    ),
    Family(
        name="deepseek",
        title="DeepSeek V2.5/V3 (<｜User｜> <｜Assistant｜>)",
        used_by="DeepSeek V2.5, V3 chat",
        generation=_DS_ASSISTANT,
        ollama=_by_role(Wrap(_DS_USER, ""), Wrap(_DS_ASSISTANT, _DS_EOS), _DS_ASSISTANT).replace(
            "{{ $sys := .System }}", "{{ $sys := .System }}{{ .System }}", 1
        ),
        **_DEEPSEEK,
    ),
    Family(
        name="deepseek-r1",
        title="DeepSeek R1 (the generation prompt opens <think>)",
        used_by="DeepSeek R1 and its distills",
        generation=_DS_ASSISTANT + "<think>\n",
        ollama=_by_role(Wrap(_DS_USER, ""), Wrap(_DS_ASSISTANT, _DS_EOS), _DS_ASSISTANT + "<think>\n").replace(
            "{{ $sys := .System }}", "{{ $sys := .System }}{{ .System }}", 1
        ),
        **_DEEPSEEK,
    ),
    Family(
        name="zephyr",
        title="Zephyr (<|user|> ... </s>)",
        used_by="Zephyr, TinyLlama Chat",
        bos="",
        system=SystemPlacement.TURN,
        system_wrap=Wrap("<|system|>\n", "</s>\n"),
        user=Wrap("<|user|>\n", "</s>\n"),
        assistant=Wrap("<|assistant|>\n", "</s>\n"),
        generation="<|assistant|>\n",
        ollama=_turns("<|{{ .Role }}|>\n", "</s>\n", "<|assistant|>\n"),
        stop=("<|user|>", "<|assistant|>", "</s>"),
    ),
)

BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}


def family(name: str) -> Family:
    if name not in BY_NAME:
        raise KeyError(f"unknown chat-template family {name!r}; families: {', '.join(BY_NAME)}")
    return BY_NAME[name]


# --- detection ------------------------------------------------------------------------------------------


def _probe(name: str, *turns: tuple[str, str], ending: Ending = Ending.REPLY) -> Conversation:
    return Conversation(
        name=name,
        purpose="detection probe",
        messages=tuple(Message(role=r, content=c) for r, c in turns),  # type: ignore[arg-type]
        ending=ending,
    )


#: Conversations that tell the families apart: system or not, one or several turns, open or closed.
PROBES: tuple[Conversation, ...] = (
    _probe("user", ("user", "Uone")),
    _probe("system_user", ("system", "Sone"), ("user", "Uone")),
    _probe("turns", ("system", "Sone"), ("user", "Uone"), ("assistant", "Aone"), ("user", "Utwo")),
    _probe("turns_no_system", ("user", "Uone"), ("assistant", "Aone"), ("user", "Utwo")),
    _probe("closed", ("user", "Uone"), ("assistant", "Aone"), ending=Ending.CLOSED),
    _probe("system_closed", ("system", "Sone"), ("user", "Uone"), ("assistant", "Aone"), ending=Ending.CLOSED),
)


@dataclass(frozen=True)
class Detection:
    """What `detect` found: the family (None: unknown), a default system prompt the template adds, and why."""

    family: Family | None
    default_system: str | None
    reason: str
    #: the BOS text the template writes first although the family has none (e.g. ChatML after {{ bos_token }})
    leading_bos: str = ""

    @property
    def name(self) -> str | None:
        return self.family.name if self.family else None


def _candidate(template: str, probe: Conversation, bos: str, eos: str) -> str | None:
    try:
        return render_jinja(template, probe.as_dicts(), probe.add_generation_prompt, bos_token=bos, eos_token=eos)
    except TemplateRefused:
        return None


def _expected(fam: Family, probe: Conversation, default_system: str | None) -> str | None:
    try:
        return fam.render(probe.messages, probe.ending, default_system if not probe.has_system else None)
    except TemplateRefused:
        return None


def _default_system(fam: Family, rendered: str, probe: Conversation) -> str | None:
    """The default system prompt the template wrote for a system-less probe, if the rest is the family's."""
    if fam.system is not SystemPlacement.TURN or probe.has_system:
        return None
    marker = "\x00"
    shaped = fam.render(probe.messages, probe.ending, marker)
    head, _, tail = shaped.partition(marker)
    if rendered.startswith(head) and rendered.endswith(tail) and len(rendered) >= len(head) + len(tail):
        text = rendered[len(head) : len(rendered) - len(tail)]
        return text if fam.render(probe.messages, probe.ending, text) == rendered else None
    return None


def _first_difference(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at character {i}: template {a[max(0, i - 12) : i + 12]!r}, family {b[max(0, i - 12) : i + 12]!r}"


def _match(fam: Family, rendered: list[str | None]) -> tuple[bool, str | None, str]:
    default: str | None = None
    for probe, got in zip(PROBES, rendered):
        if default is None and got is not None:
            default = _default_system(fam, got, probe) if got != _expected(fam, probe, None) else None
        want = _expected(fam, probe, default)
        if got != want:
            if got is None or want is None:
                who = "the template" if got is None else "the family"
                return False, None, f"probe {probe.name!r}: {who} refuses it"
            return False, None, f"probe {probe.name!r} {_first_difference(got, want)}"
    return True, default, "every probe renders the same"


def detect(template: str | None, bos_token: str = "", eos_token: str = "") -> Detection:
    """The family whose structure `template` renders, given the model's BOS/EOS texts; family None if none."""
    if not template:
        return Detection(None, None, "the model has no chat template")
    try:
        rendered = [_candidate(template, p, bos_token, eos_token) for p in PROBES]
    except Exception as exc:  # a template that does not even render: nothing to match
        return Detection(None, None, f"the chat template does not render: {type(exc).__name__}: {exc}")
    if all(r is None for r in rendered):
        return Detection(None, None, "the chat template refuses every probe conversation")
    reasons = []
    leads = bool(bos_token) and all(r is None or r.startswith(bos_token) for r in rendered)
    for fam in FAMILIES:
        ok, default, why = _match(fam, rendered)
        lead = ""
        if not ok and not fam.bos and leads:  # the family's format after a BOS the template writes first
            ok, default, why = _match(fam, [r[len(bos_token) :] if r is not None else None for r in rendered])
            lead = bos_token if ok else ""
        if ok:
            extra = f"; it adds a default system prompt ({len(default)} characters)" if default else ""
            extra += f"; after a leading {lead!r}" if lead else ""
            return Detection(fam, default, f"renders as {fam.title}{extra}", lead)
        reasons.append(f"{fam.name}: {why}")
    return Detection(None, None, "no known family renders the same: " + "; ".join(reasons[:3]) + " ...")


# --- Ollama ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OllamaTranslation:
    """The Modelfile pieces for a detected family: TEMPLATE text, stop strings, default SYSTEM, notes."""

    family: str
    template: str
    stop: tuple[str, ...]
    system: str | None
    notes: tuple[str, ...]


def ollama_template(detection: Detection, add_bos: bool) -> OllamaTranslation | None:
    """The TEMPLATE for Ollama, given whether the GGUF's tokenizer adds the BOS itself (add_bos_token).

    Ollama tokenizes the rendered prompt with the GGUF's vocabulary and adds the BOS when the GGUF asks for
    it, so the BOS text the family writes first is left out then, and written as text otherwise.
    """
    fam = detection.family
    if fam is None:
        return None
    notes: list[str] = []
    text = fam.ollama
    bos = fam.bos or detection.leading_bos
    if bos and not add_bos:
        text = bos + text
        notes.append(f"the GGUF does not add a BOS token, so the TEMPLATE writes {bos!r}")
    elif not bos and add_bos:
        notes.append(
            "the GGUF adds a BOS token (tokenizer.ggml.add_bos_token) but the chat template writes none: Ollama's "
            "prompt will start with one that transformers' apply_chat_template does not write"
        )
    return OllamaTranslation(fam.name, text, fam.stop, detection.default_system, tuple(notes))
