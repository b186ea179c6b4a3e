"""Token sequences compared: equal, or the first difference with a few tokens of context on each side.

A difference names the conversation, the runtime, the index of the first token that differs, both tokens
(id and piece), the tokens just before and after on each side, and a short diagnosis when the pattern is
a known one (an extra or missing BOS; a space the SentencePiece tokenizer adds after a control token; a
generation prompt missing at the end).
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.chat.runtimes.base import Rendering

CONTEXT = 4


@dataclass(frozen=True)
class Token:
    id: int
    piece: str

    def __str__(self) -> str:
        return f"{self.piece!r}({self.id})"


@dataclass(frozen=True)
class Difference:
    """Where `got` first departs from `reference`, with context, and what it probably means."""

    conversation: str
    runtime: str
    reference_runtime: str
    mode: str
    index: int
    reference_len: int
    got_len: int
    expected: Token | None
    got: Token | None
    before: tuple[Token, ...]
    reference_after: tuple[Token, ...]
    got_after: tuple[Token, ...]
    diagnosis: str

    def summary(self) -> str:
        exp = str(self.expected) if self.expected else "end of prompt"
        got = str(self.got) if self.got else "end of prompt"
        ctx = " ".join(str(t) for t in self.before) or "(start)"
        return (
            f"{self.conversation}: {self.runtime} differs from {self.reference_runtime} at token {self.index} "
            f"(after {ctx}): expected {exp}, got {got}" + (f" — {self.diagnosis}" if self.diagnosis else "")
        )

    def as_dict(self) -> dict:
        def toks(ts: tuple[Token, ...]) -> list[dict]:
            return [{"id": t.id, "piece": t.piece} for t in ts]

        return {
            "conversation": self.conversation,
            "runtime": self.runtime,
            "reference": self.reference_runtime,
            "mode": self.mode,
            "index": self.index,
            "reference_tokens": self.reference_len,
            "tokens": self.got_len,
            "expected": {"id": self.expected.id, "piece": self.expected.piece} if self.expected else None,
            "got": {"id": self.got.id, "piece": self.got.piece} if self.got else None,
            "before": toks(self.before),
            "reference_after": toks(self.reference_after),
            "got_after": toks(self.got_after),
            "diagnosis": self.diagnosis,
            "summary": self.summary(),
        }


def _tokens(r: Rendering, lo: int, hi: int) -> tuple[Token, ...]:
    assert r.tokens is not None and r.pieces is not None
    return tuple(Token(r.tokens[i], r.pieces[i]) for i in range(max(lo, 0), min(hi, len(r.tokens))))


def _space_after_control(pa: tuple[str, ...], pb: tuple[str, ...], i: int) -> bool:
    return i < len(pa) and i < len(pb) and pb[i].startswith("▁") and len(pb[i]) > 1 and pb[i][1:].startswith(pa[i])


def _diagnose(ref: Rendering, got: Rendering, i: int, bos_piece: str | None) -> str:
    a, b = ref.tokens or (), got.tokens or ()
    pa, pb = ref.pieces or (), got.pieces or ()
    if i == 0 and b and bos_piece and pb[0] == bos_piece and (not pa or pa[0] != bos_piece):
        rest = (
            "the rest is the same"
            if b[1:] == a
            else "after it: " + (_diagnose(ref, _drop_first(got), _first(a, b[1:]), None) or "more differences")
        )
        return (
            "an extra BOS at the start: the GGUF adds one (tokenizer.ggml.add_bos_token) that the chat template does "
            f"not write (make the template write {{{{ bos_token }}}}, or set add_bos_token false); {rest}"
        )
    if i == 0 and a and bos_piece and pa[0] == bos_piece and (not pb or pb[0] != bos_piece):
        return "the BOS is missing: this runtime neither writes nor adds the BOS token the reference starts with"
    if _space_after_control(pa, pb, i):
        return (
            "a space is added after a control token: llama.cpp's SentencePiece tokenizer (add_space_prefix) does this; "
            "the HF tokenizer does not (legacy=False)"
        )
    if i == len(b) and len(a) > len(b):
        return f"the prompt ends early: {''.join(pa[i:])!r} (the generation prompt?) is missing"
    if i == len(a) and len(b) > len(a):
        return f"extra tokens at the end: {''.join(pb[i:])!r}"
    return ""


def _first(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _drop_first(r: Rendering) -> Rendering:
    from dataclasses import replace

    return replace(r, tokens=(r.tokens or ())[1:], pieces=(r.pieces or ())[1:])


def compare(reference: Rendering, got: Rendering, bos_piece: str | None = None) -> Difference | None:
    """None when the token sequences are equal; else the first difference."""
    a, b = reference.tokens, got.tokens
    if a is None or b is None:
        raise ValueError("compare needs two renderings that have tokens")
    if a == b:
        return None
    i = _first(a, b)
    return Difference(
        conversation=got.conversation,
        runtime=got.runtime,
        reference_runtime=reference.runtime,
        mode=got.mode.value,
        index=i,
        reference_len=len(a),
        got_len=len(b),
        expected=_tokens(reference, i, i + 1)[0] if i < len(a) else None,
        got=_tokens(got, i, i + 1)[0] if i < len(b) else None,
        before=_tokens(reference, i - CONTEXT, i),
        reference_after=_tokens(reference, i + 1, i + 1 + CONTEXT),
        got_after=_tokens(got, i + 1, i + 1 + CONTEXT),
        diagnosis=_diagnose(reference, got, i, bos_piece),
    )
