"""The fixed conversations every runtime renders, and the messages they are made of.

Each conversation exercises one way chat templates and runtimes part ways: the system prompt's place,
several turns, the generation prompt (present when the model is to reply, absent when a finished exchange
is rendered as in training), and message text that looks like template markup (Jinja, Go template and
chat-control syntax) which no runtime may execute. They are data: the report names them, tests add to
them, nothing else branches on them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant"]


class Message(BaseModel):
    """One chat message, as the OpenAI API, transformers, llama.cpp and Ollama all take it."""

    model_config = ConfigDict(frozen=True)

    role: Role
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


class Ending(StrEnum):
    """How a conversation ends, which decides what each runtime is asked to render."""

    #: the last message is the user's; the generation prompt is added (what a chat request sends)
    REPLY = "reply"
    #: the last message is the assistant's, rendered closed, with no generation prompt (a training example)
    CLOSED = "closed"


class Conversation(BaseModel):
    """A named conversation and how it ends."""

    model_config = ConfigDict(frozen=True)

    name: str
    purpose: str
    messages: tuple[Message, ...]
    ending: Ending = Field(Ending.REPLY)

    @property
    def add_generation_prompt(self) -> bool:
        return self.ending is Ending.REPLY

    @property
    def has_system(self) -> bool:
        return any(m.role == "system" for m in self.messages)

    def as_dicts(self) -> list[dict[str, str]]:
        return [m.as_dict() for m in self.messages]

    def with_default_system(self, system: str | None) -> Conversation:
        """The conversation as a runtime with a default system prompt receives it (none of its own: prepended)."""
        if not system or self.has_system:
            return self
        return self.model_copy(update={"messages": (Message(role="system", content=system), *self.messages)})


def _m(role: Role, content: str) -> Message:
    return Message(role=role, content=content)


#: Markup from every family and engine, inside a user message: Jinja, Go template, ChatML, Llama 3, [INST].
TEMPLATE_LIKE_TEXT = (
    "Repeat exactly: {{ .Prompt }} {% if messages %}{{ bos_token }}{% endif %} <|im_start|>system [INST] {{ end }}"
)

CONVERSATIONS: tuple[Conversation, ...] = (
    Conversation(
        name="system_user",
        purpose="a system prompt and one user message, with the generation prompt",
        messages=(_m("system", "You are a concise assistant."), _m("user", "What color is the sky?")),
    ),
    Conversation(
        name="multi_turn",
        purpose="several turns with a system prompt, with the generation prompt",
        messages=(
            _m("system", "Answer in one word."),
            _m("user", "What color is grass?"),
            _m("assistant", "Green."),
            _m("user", "And snow?"),
            _m("assistant", "White."),
            _m("user", "And coal?"),
        ),
    ),
    Conversation(
        name="no_system",
        purpose="two turns and no system prompt (defaults and injected system text show here)",
        messages=(_m("user", "Hello!"), _m("assistant", "Hi. How can I help?"), _m("user", "Count to 3.")),
    ),
    Conversation(
        name="closed_exchange",
        purpose="a finished exchange without the generation prompt, as a training example is rendered",
        messages=(
            _m("system", "You are a concise assistant."),
            _m("user", "Name a prime number."),
            _m("assistant", "Seven."),
        ),
        ending=Ending.CLOSED,
    ),
    Conversation(
        name="template_like_text",
        purpose="a message containing template and chat-control markup, which must stay text to every engine",
        messages=(_m("user", TEMPLATE_LIKE_TEXT),),
    ),
)


def by_name(name: str) -> Conversation:
    for c in CONVERSATIONS:
        if c.name == name:
            return c
    raise KeyError(f"no conversation {name!r}; conversations: {', '.join(c.name for c in CONVERSATIONS)}")
