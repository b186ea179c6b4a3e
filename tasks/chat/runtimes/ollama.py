"""Ollama: the Modelfile's TEMPLATE rendered by Go's text/template with Ollama's values, then llama.cpp's tokenizer.

The Ollama app cannot run here; its prompt step can. `tasks/chat/gorender` is a tiny Go program (standard
library only) that executes the TEMPLATE as Ollama's server does (collated .System and .Messages, or the
legacy .System/.Prompt/.Response form). As Ollama's chat endpoint does, the Modelfile's SYSTEM is prepended
as a system message when the conversation has none. The text is tokenized with the FROM GGUF's vocabulary,
special tokens parsed, BOS added when the GGUF asks for it (Ollama's llama.cpp runner tokenizes so).
Ollama stops on the GGUF's end-of-generation tokens and on the Modelfile's `PARAMETER stop` strings.

A conversation that ends on an assistant message is continued by Ollama (prefill), not closed: it is
compared with transformers' `continue_final_message` rendering of the same conversation.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tasks.chat import gorender
from tasks.chat.conversations import Conversation, Message
from tasks.chat.runtimes.base import Mode, Rendering, Runtime, RuntimeUnavailable, StopSet
from tasks.chat.vocab import GgufVocab
from tasks.local.ollama import Modelfile


class OllamaRuntime(Runtime):
    name = "ollama"
    title = "Ollama (Modelfile TEMPLATE, Go text/template)"

    def __init__(self, modelfile: Modelfile, vocab: GgufVocab, modelfile_path: Path | None = None):
        if not modelfile.template:
            raise RuntimeUnavailable(
                "the Modelfile has no TEMPLATE (the chat template's family is not in the table): Ollama will choose "
                "a template itself when it imports the GGUF, so what it renders cannot be checked here"
            )
        self.modelfile = modelfile
        self.vocab = vocab
        self.path = modelfile_path
        self.default_system = modelfile.system or None
        gorender.binary()  # raises GoUnavailable (with what to install) before any conversation is tried
        self._cache: dict[tuple[str, Mode], gorender.GoRendering] = {}

    def describe(self) -> str:
        where = self.path.name if self.path else "Modelfile"
        return f"TEMPLATE of {where} ({gorender.go_version() or 'Go'}), {self.vocab.path.name}'s vocabulary"

    def mode_for(self, conversation: Conversation) -> Mode:
        return Mode.REPLY if conversation.add_generation_prompt else Mode.CONTINUED

    def messages(self, conversation: Conversation) -> list[dict[str, str]]:
        msgs = list(conversation.messages)
        if self.modelfile.system and (not msgs or msgs[0].role != "system"):
            msgs = [Message(role="system", content=self.modelfile.system), *msgs]
        return [m.as_dict() for m in msgs]

    def prefetch(self, conversations: list[Conversation]) -> None:
        """Render all conversations in one Go process (one start instead of one per conversation)."""
        todo = [c for c in conversations if (c.name, self.mode_for(c)) not in self._cache]
        for conv, out in zip(todo, gorender.render(self.modelfile.template or "", [self.messages(c) for c in todo])):
            self._cache[(conv.name, self.mode_for(conv))] = out

    def render(self, conversation: Conversation, mode: Mode) -> Rendering:
        base = Rendering(runtime=self.name, conversation=conversation.name, mode=mode)
        if (conversation.name, mode) not in self._cache:
            self.prefetch([conversation])
        out = self._cache[(conversation.name, mode)]
        if out.prompt is None:
            return replace(base, error=f"Go template execution failed: {out.error}")
        ids = self.vocab.tokenize(out.prompt, add_special=True)
        return replace(base, text=out.prompt, tokens=tuple(ids), pieces=tuple(self.vocab.piece(t) for t in ids))

    def stops(self) -> StopSet:
        return StopSet(
            token_ids=self.vocab.eog_ids,
            strings=self.modelfile.stops,
            source=f"PARAMETER stop lines + llama.cpp end-of-generation tokens of {self.vocab.path.name}",
        )
