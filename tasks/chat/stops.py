"""Stop-token agreement: every runtime must stop where the chat template ends an assistant turn.

The end-of-turn token is read off the reference rendering: a finished exchange rendered closed, minus the
same exchange with its final assistant message left open, starts with it (`<|im_end|>`, `<|eot_id|>`,
`</s>`, `<end_of_turn>` ...). Then:

- transformers stops on `generation_config.eos_token_id`: it must contain the end-of-turn token (else
  `generate()` runs past every answer: the "EOS rewritten by the merge" bug);
- llama.cpp (the served model, LM Studio) stops on its end-of-generation set (EOS, EOT and the end-of-turn
  tokens it recognises): it must contain it; LM Studio's stopStrings count too;
- Ollama stops on the same set and on the Modelfile's `PARAMETER stop` strings: one of them must cover it.

Tokens transformers stops on that llama.cpp does not are warned about (llama.cpp would run on there).
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.chat.compare import Token
from tasks.chat.conversations import Conversation
from tasks.chat.findings import Finding, Severity
from tasks.chat.runtimes.base import Mode, Runtime, StopSet


@dataclass(frozen=True)
class TurnEnd:
    """The token that closes an assistant turn (None when the template closes turns with plain text)."""

    token: Token | None
    text: str
    how: str
    control: bool = False


def turn_end(reference: Runtime, closed: Conversation, is_control=None) -> TurnEnd:
    """The end-of-turn token of `reference`'s template, from `closed` (a conversation ending on the assistant)."""
    a = reference.render(closed, Mode.CLOSED)
    b = reference.render(closed, Mode.CONTINUED)
    if not (a.ok and b.ok and a.tokens and b.tokens is not None):
        return TurnEnd(None, "", f"{reference.name} could not render {closed.name} closed and continued")
    n = len(b.tokens)
    if a.tokens[:n] != b.tokens or len(a.tokens) == n:
        return TurnEnd(None, "", f"the closed rendering of {closed.name} does not extend the continued one")
    tail_text = (a.text or "")[len(b.text or "") :]
    tok = Token(a.tokens[n], a.pieces[n] if a.pieces else str(a.tokens[n]))
    control = bool(is_control(tok.id)) if is_control else tok.piece.startswith("<") and tok.piece.endswith(">")
    return TurnEnd(tok, tail_text, f"the first token after the assistant's text in {closed.name}", control)


def agreement(end: TurnEnd, stops: dict[str, StopSet], hf_name: str = "transformers") -> list[Finding]:
    """Findings for each runtime's stop set against the end-of-turn token (and transformers' list)."""
    out: list[Finding] = []
    if end.token is None:
        out.append(Finding(Severity.WARNING, "stops", f"could not find the end-of-turn token: {end.how}"))
        return out
    t = end.token
    if not end.control:
        out.append(
            Finding(
                Severity.WARNING,
                "stops",
                f"the template ends an assistant turn with {t} {end.text!r}, not a control token: runtimes stop on it "
                "only through stop strings",
            )
        )
    for name, s in stops.items():
        covered = t.id in s.token_ids or any(x and x in (t.piece, end.text.strip()) for x in s.strings)
        if not covered:
            if name == hf_name:
                what = f"{s.source} is {list(s.token_ids)}: transformers' generate() will not stop at the end of a turn"
            else:
                what = (
                    f"{name} does not stop on it ({s.source}: ids {list(s.token_ids)[:8]}, strings {list(s.strings)})"
                )
            out.append(
                Finding(Severity.ERROR, "stops", f"the end-of-turn token {t} is not a stop for {name}: {what}", name)
            )
    hf = stops.get(hf_name)
    if hf is not None:
        gaps: dict[tuple[int, ...], list[str]] = {}
        for name, s in stops.items():
            missing = tuple(i for i in hf.token_ids if i not in s.token_ids)
            if name != hf_name and s.token_ids and missing:
                gaps.setdefault(missing, []).append(name)
        for missing, names in gaps.items():
            out.append(
                Finding(
                    Severity.WARNING,
                    "stops",
                    f"transformers stops on {list(missing)} ({hf.source}) but {', '.join(names)} do(es) not: "
                    "generation would go on where transformers ends",
                )
            )
    return out


def gguf_eos_agreement(vocab, hf: StopSet | None) -> list[Finding]:
    """The GGUF's EOS/EOT must be among transformers' stops: else the merge or the converter rewrote the EOS.

    llama.cpp may still stop at the end of a turn (it recognises `<|im_end|>`, `<|eot_id|>` ... by their text),
    which the end-of-turn check shows; this names the rewritten EOS itself.
    """
    if hf is None or not hf.token_ids:
        return []
    ids = [i for i in (vocab.eos_id, vocab.eot_id) if i is not None]
    if not ids or set(ids) & set(hf.token_ids):
        return []
    named = ", ".join(f"{vocab.piece(i)!r}({i})" for i in dict.fromkeys(ids))
    return [
        Finding(
            Severity.WARNING,
            "stops",
            f"the GGUF's EOS/EOT ({named}) is none of transformers' stops {list(hf.token_ids)} ({hf.source}): the "
            "merged model's config or the converter changed the EOS",
            "llama.cpp",
        )
    ]
