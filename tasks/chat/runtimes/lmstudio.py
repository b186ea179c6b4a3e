"""LM Studio: the GGUF's chat template, unless the model's per-model config overrides it.

LM Studio keeps per-model settings in `<home>/.internal/user-concrete-model-default-config/<publisher>/
<repo>/<file>.json` (what its UI writes, and what local_deploy writes); a prompt-template override there is
the `llm.prediction.promptTemplate` field: `{"type": "jinja", "jinjaPromptTemplate": {"template", "bosToken",
"eosToken"}, "stopStrings": [...]}` or `{"type": "manual", "manualPromptTemplate": {"beforeSystem",
"afterSystem", "beforeUser", "afterUser", "beforeAssistant", "afterAssistant"}, ...}`. The app itself cannot
run here: its Jinja engine is stood in for by llama-cpp-python's formatter (the same template language) and
its tokenizer by the GGUF's llama.cpp vocabulary, which LM Studio's llama.cpp engine uses.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from tasks.chat.conversations import Conversation
from tasks.chat.runtimes.base import Mode, Rendering, RuntimeUnavailable, StopSet
from tasks.chat.runtimes.gguf import JinjaGgufRuntime
from tasks.chat.vocab import GgufVocab

PROMPT_TEMPLATE_KEY = "llm.prediction.promptTemplate"
SYSTEM_PROMPT_KEY = "llm.prediction.systemPrompt"


def config_field(config: dict[str, Any] | None, key: str) -> Any:
    """A field's value in a per-model config ("operation" then "load" field lists), or None."""
    for section in ("operation", "load"):
        for f in ((config or {}).get(section) or {}).get("fields") or []:
            if f.get("key") == key:
                return f.get("value")
    return None


def prompt_template_override(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The `llm.prediction.promptTemplate` value of a per-model config, if it sets one."""
    value = config_field(config, PROMPT_TEMPLATE_KEY)
    return value if isinstance(value, dict) else None


class LMStudioRuntime(JinjaGgufRuntime):
    name = "lmstudio"
    title = "LM Studio (GGUF template or per-model override)"

    def __init__(
        self,
        vocab: GgufVocab,
        config: dict[str, Any] | None = None,
        config_path: Path | None = None,
    ):
        self.override = prompt_template_override(config)
        self.config_path = config_path
        self.manual: dict[str, str] | None = None
        template = vocab.chat_template
        bos, eos = vocab.bos_text, vocab.eos_text
        if self.override and self.override.get("type") == "jinja":
            jinja = self.override.get("jinjaPromptTemplate") or {}
            template = jinja.get("template") or template
            bos, eos = jinja.get("bosToken", bos), jinja.get("eosToken", eos)
        elif self.override and self.override.get("type") == "manual":
            self.manual = dict(self.override.get("manualPromptTemplate") or {})
        if not template and self.manual is None:
            raise RuntimeUnavailable(f"{vocab.path.name} has no chat template and no LM Studio override sets one")
        system = config_field(config, SYSTEM_PROMPT_KEY)
        super().__init__(vocab, template or "", system if isinstance(system, str) and system else None)
        self.bos_text, self.eos_text = bos, eos

    @property
    def source(self) -> str:
        where = self.config_path.name if self.config_path else "per-model config"
        if self.manual is not None:
            return f"manual prompt template in {where}"
        return f"Jinja override in {where}" if self.override else f"the GGUF's template ({self.vocab.path.name})"

    def describe(self) -> str:
        return f"{self.source}; {self.vocab.path.name}'s vocabulary"

    def render(self, conversation: Conversation, mode: Mode) -> Rendering:
        if self.manual is None:
            return super().render(conversation, mode)
        m = self.manual
        parts = []
        for msg in conversation.with_default_system(self.default_system).messages:
            key = msg.role.capitalize()
            parts.append(m.get(f"before{key}", "") + msg.content + m.get(f"after{key}", ""))
        if mode is Mode.REPLY:
            parts.append(m.get("beforeAssistant", ""))
        text = "".join(parts)
        ids = self.vocab.tokenize(text, add_special=True)
        return replace(
            Rendering(runtime=self.name, conversation=conversation.name, mode=mode),
            text=text,
            tokens=tuple(ids),
            pieces=tuple(self.vocab.piece(t) for t in ids),
        )

    def stops(self) -> StopSet:
        base = super().stops()
        extra = tuple((self.override or {}).get("stopStrings") or ())
        return replace(base, strings=base.strings + extra, source=base.source + (" + stopStrings" if extra else ""))
