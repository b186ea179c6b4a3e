"""llama.cpp's logits for the held-out text, chunk by chunk, as llama-perplexity asks for them.

`llama_cpp.Llama(logits_all=True)` keeps an [n_ctx x n_vocab] float32 copy of every logit and makes llama.cpp
output them all: two buffers of 311 MB each at n_ctx 512 with a 152k vocabulary, half of them for positions
that are never scored. So the chunks are decoded through llama.cpp's batch API with logits requested only for
the scored half (positions >= n_ctx // 2), exactly as `llama-perplexity` does, and the logits are read as a
view of llama.cpp's own output buffer: one chunk's scored rows are the only logits in memory.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.evaluate.kl import first_scored

log = logging.getLogger("loraship.evaluate")
#: The smallest window llama-perplexity's scheme makes sense for (a few scored tokens per chunk).
MIN_CTX = 16


@dataclass(frozen=True)
class Windows:
    """How the held-out tokens are cut: `n_chunk` chunks of `n_ctx` tokens, from `tokens`."""

    tokens: np.ndarray  # int32, the whole tokenization (BOS first when the model adds one)
    n_ctx: int
    n_chunk: int

    def chunk(self, i: int) -> np.ndarray:
        return self.tokens[i * self.n_ctx : (i + 1) * self.n_ctx]

    def targets(self, i: int) -> np.ndarray:
        """The tokens the scored rows of chunk i predict."""
        c = self.chunk(i)
        return c[first_scored(self.n_ctx) + 1 :].astype(np.int64)


def plan_windows(tokens: list[int] | np.ndarray, n_ctx: int, max_tokens: int | None = None) -> Windows:
    """llama-perplexity's chunks (n_tokens // n_ctx, the remainder dropped); a text shorter than two windows
    gets a smaller window (n_tokens // 2, logged) rather than no number at all."""
    toks = np.asarray(tokens, dtype=np.int32)
    if max_tokens:
        toks = toks[:max_tokens]
    if len(toks) < 2 * MIN_CTX:
        raise ValueError(f"the held-out text is {len(toks)} tokens; scoring needs at least {2 * MIN_CTX}")
    ctx = n_ctx
    if len(toks) < 2 * n_ctx:
        ctx = max(MIN_CTX, len(toks) // 2)
        log.info("held-out text of %d tokens is shorter than two windows of %d: windows of %d", len(toks), n_ctx, ctx)
    return Windows(toks, ctx, len(toks) // ctx)


def load_llama(model_path: Path | str, n_ctx: int, threads: int | None = None, **kw: Any) -> Any:
    """llama.cpp's Llama for scoring: every layer on the GPU when the build offloads (toolchain.gpu_layers)."""
    from llama_cpp import Llama

    from tasks.gguf.toolchain import gpu_layers

    args: dict[str, Any] = {"model_path": str(model_path), "n_ctx": n_ctx, "verbose": False, **kw}
    args.setdefault("n_gpu_layers", gpu_layers())
    if threads:
        args.update(n_threads=threads, n_threads_batch=threads)
    return Llama(**args)


def tokenize(llm: Any, text: str) -> list[int]:
    """As llama-perplexity: special tokens added (BOS when the vocabulary asks for it), none parsed in the text."""
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)


class ChunkDecoder:
    """Decode chunks of one model and hand back the scored rows' logits (a view valid until the next chunk)."""

    def __init__(self, model_path: Path | str, n_ctx: int, threads: int | None = None):
        import llama_cpp

        self._lib = llama_cpp
        # one window per decode: a batch of n_ctx tokens; logits only for the scored half
        self.llm = load_llama(model_path, n_ctx, threads, n_batch=n_ctx, logits_all=False)
        self.n_ctx = n_ctx
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(vocab))
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def __enter__(self) -> ChunkDecoder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.batch is not None:
            self._lib.llama_batch_free(self.batch)
            self.batch = None
        self.llm.close()

    def logits(self, chunk: np.ndarray) -> np.ndarray:
        """[n_ctx - n_ctx//2, n_vocab] float32 logits at positions n_ctx//2 ... n_ctx-1 of `chunk`."""
        lib, b, n = self._lib, self.batch, len(chunk)
        if n != self.n_ctx:
            raise ValueError(f"chunk of {n} tokens for windows of {self.n_ctx}")
        first = first_scored(n)
        mem = lib.llama_get_memory(self.llm.ctx)
        if mem is not None:
            lib.llama_memory_clear(mem, True)
        b.n_tokens = n
        for k in range(n):
            b.token[k] = self.bos if (k == 0 and self.add_bos) else int(chunk[k])
            b.pos[k] = k
            b.n_seq_id[k] = 1
            b.seq_id[k][0] = 0
            b.logits[k] = 1 if k >= first else 0
        rc = lib.llama_decode(self.llm.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) on a chunk of {n} tokens")
        ptr = lib.llama_get_logits(self.llm.ctx)
        rows = n - first
        buf = ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float * (rows * self.n_vocab))).contents
        return np.frombuffer(buf, dtype=np.float32).reshape(rows, self.n_vocab)

    def scored(self, windows: Windows) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(chunk index, logits of the scored rows [scored, n_vocab], their targets) for every chunk."""
        for i in range(windows.n_chunk):
            yield i, self.logits(windows.chunk(i))[:-1], windows.targets(i)
