"""A short generation through the served model must end on a stop token, not at max_tokens.

Two requests to the OpenAI-compatible server (`/v1/chat/completions`, temperature 0):

- **forced**: the end-of-turn token gets a large logit bias, so it is the first token generated; a server
  that stops on it answers at once with `finish_reason: "stop"`. A server that does not (an EOS the
  merge rewrote, a GGUF whose end-of-generation set lacks the token) keeps generating to max_tokens. This
  checks the server's stop wiring whatever the model's quality.
- **natural**: the model answers the `system_user` conversation; it must end with `finish_reason: "stop"`
  within `max_tokens` (a model that never learned to emit the end-of-turn token, e.g. trained with the EOS
  masked out as padding, runs to the limit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import requests

from tasks.chat.conversations import Conversation


@dataclass(frozen=True)
class Probe:
    kind: str  # forced | natural
    finish_reason: str | None
    completion_tokens: int | None
    content: str
    max_tokens: int
    error: str | None = None

    @property
    def stopped(self) -> bool:
        return self.finish_reason == "stop"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stopped": self.stopped}


def _ask(base_url: str, model: str, messages: list[dict[str, str]], max_tokens: int, **extra: Any) -> dict[str, Any]:
    resp = requests.post(
        f"{base_url.rstrip('/')}/chat/completions",
        json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "seed": 0, **extra},
        timeout=120,
    )
    resp.raise_for_status()
    return resp.json()


def probe(
    base_url: str, model: str, conversation: Conversation, kind: str, max_tokens: int, stop_id: int | None = None
) -> Probe:
    """One request; `kind` "forced" biases `stop_id` to be generated first."""
    extra: dict[str, Any] = {}
    if kind == "forced":
        if stop_id is None:
            raise ValueError("a forced probe needs the end-of-turn token id")
        extra = {"logit_bias": {str(stop_id): 100.0}}
    try:
        out = _ask(base_url, model, conversation.as_dicts(), max_tokens, **extra)
    except requests.RequestException as exc:
        return Probe(kind, None, None, "", max_tokens, error=f"{type(exc).__name__}: {exc}"[:300])
    choice = (out.get("choices") or [{}])[0]
    content = ((choice.get("message") or {}).get("content")) or ""
    return Probe(
        kind,
        choice.get("finish_reason"),
        (out.get("usage") or {}).get("completion_tokens"),
        content[:200],
        max_tokens,
    )
