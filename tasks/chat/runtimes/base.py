"""The contract every runtime renderer keeps: render a conversation to prompt text and token ids, say its stops.

A runtime is one place the model will be prompted: transformers (the reference: what `apply_chat_template`
gives, which is what a fine-tune was trained on), llama.cpp reading the GGUF, Ollama with its Modelfile,
LM Studio with its per-model config. Each renders the fixed conversations as that runtime would and
tokenizes the text with the vocabulary that runtime uses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum

from tasks.chat.conversations import Conversation


class Mode(StrEnum):
    """What was rendered: a prompt for a reply, a closed exchange, or a final assistant message left open."""

    REPLY = "reply"
    CLOSED = "closed"
    CONTINUED = "continued"


@dataclass(frozen=True)
class Rendering:
    """One conversation in one runtime: the text, its token ids and their pieces, or why there is none."""

    runtime: str
    conversation: str
    mode: Mode
    text: str | None = None
    tokens: tuple[int, ...] | None = None
    pieces: tuple[str, ...] | None = None
    refused: str | None = None  # the template refused this conversation (e.g. no system role)
    error: str | None = None  # the runtime failed to render it

    @property
    def ok(self) -> bool:
        return self.tokens is not None


@dataclass(frozen=True)
class StopSet:
    """What makes a runtime end a reply: token ids it stops on and stop strings."""

    token_ids: tuple[int, ...] = ()
    strings: tuple[str, ...] = ()
    source: str = ""
    notes: tuple[str, ...] = field(default=())


class Runtime(ABC):
    """One runtime: `name` (report key), `title`, what it reads (`describe`), `render`, `stops`."""

    name: str
    title: str
    #: a system prompt this runtime adds to a conversation that has none (Modelfile SYSTEM, LM Studio's preset)
    default_system: str | None = None

    @abstractmethod
    def describe(self) -> str:
        """One line for the report: which file/template/vocabulary this runtime uses."""

    @abstractmethod
    def render(self, conversation: Conversation, mode: Mode) -> Rendering:
        """The conversation as this runtime prompts the model with it."""

    @abstractmethod
    def stops(self) -> StopSet:
        """The tokens and strings this runtime ends a reply on."""

    def mode_for(self, conversation: Conversation) -> Mode:
        """The mode this runtime renders `conversation` in (Ollama continues a final assistant message)."""
        return Mode.REPLY if conversation.add_generation_prompt else Mode.CLOSED


class RuntimeUnavailable(Exception):
    """The runtime cannot be checked here (not deployed, no template, Go missing); the reason says why."""
