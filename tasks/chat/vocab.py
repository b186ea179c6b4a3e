"""A GGUF's tokenizer as llama.cpp itself reads it: the chat template, BOS/EOS/EOT, end-of-generation set.

Loaded through llama-cpp-python with `vocab_only=True` (no weights), so tokenization is llama.cpp's own
code from the same commit that serves the model, and "end of generation" is what llama.cpp will stop on
(`llama_vocab_is_eog`: EOS, EOT and the end-of-turn tokens llama.cpp recognises by their text).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class GgufVocab:
    """The vocabulary facts of one GGUF file; `tokenize` runs llama.cpp's tokenizer."""

    path: Path
    chat_template: str | None
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    add_bos: bool
    eog_ids: tuple[int, ...]
    metadata: dict[str, str] = field(repr=False)
    _llama: Any = field(repr=False, compare=False)

    @property
    def bos_text(self) -> str:
        return self.piece(self.bos_id) if self.bos_id is not None else ""

    @property
    def eos_text(self) -> str:
        return self.piece(self.eos_id) if self.eos_id is not None else ""

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """llama_tokenize with special tokens parsed; `add_special` adds BOS/EOS as the GGUF asks (add_bos_token)."""
        return list(self._llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))

    def piece(self, token: int) -> str:
        """The token's text as the vocabulary stores it (control tokens by name, e.g. '<|im_end|>')."""
        return self._llama._model.token_get_text(token)

    def is_control(self, token: int) -> bool:
        import llama_cpp

        attr = self._llama._model.token_get_attr(token)
        return bool(attr & (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED))


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int, size: int) -> GgufVocab:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, vocab_only=True, n_ctx=8, verbose=False)
    vocab = llm._model.vocab

    def opt(token: int) -> int | None:
        return token if token >= 0 else None

    eog = tuple(t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t))
    md = dict(llm.metadata)
    return GgufVocab(
        path=Path(path),
        chat_template=md.get("tokenizer.chat_template"),
        bos_id=opt(llm.token_bos()),
        eos_id=opt(llm.token_eos()),
        eot_id=opt(llama_cpp.llama_vocab_eot(vocab)),
        add_bos=bool(llm._model.add_bos_token()),
        eog_ids=eog,
        metadata=md,
        _llama=llm,
    )


def load_vocab(path: Path | str) -> GgufVocab:
    """The vocabulary of the GGUF at `path` (cached per file version: loading is cheap, but not free)."""
    p = Path(path).resolve()
    st = p.stat()
    return _load(str(p), st.st_mtime_ns, st.st_size)
