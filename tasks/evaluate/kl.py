"""Perplexity and KL-divergence of a quantized GGUF against the F16 GGUF, from llama.cpp's own logits.

llama.cpp's `llama-perplexity --kl-divergence` does this but is a C++ binary that is not in the
llama-cpp-python wheel (building it took 15 minutes here), so the same measurement is made through
`llama_cpp.Llama(logits_all=True)`: the held-out text is tokenized once, evaluated in windows of
`n_ctx` tokens (each window from an empty KV cache), and the log-softmax of every position's logits is
kept. Perplexity is exp(mean negative log-likelihood of the next token); the KL-divergence of a quant
is the mean over positions of sum_v p_F16(v) (log p_F16(v) - log p_quant(v)); top-1 agreement is how
often both pick the same most likely token. The F16 log-probabilities are saved to a .npy file that
each quant's worker memory-maps, so every quant is compared on exactly the same tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def load_llama(model_path: Path | str, n_ctx: int, threads: int | None = None, logits_all: bool = False) -> Any:
    from llama_cpp import Llama

    kw: dict[str, Any] = {"model_path": str(model_path), "n_ctx": n_ctx, "logits_all": logits_all, "verbose": False}
    if threads:
        kw.update(n_threads=threads, n_threads_batch=threads)
    return Llama(**kw)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return (x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))).astype(np.float32)


def token_logprobs(llm: Any, text: str, max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(targets, log-probs): row i is the model's next-token distribution that should predict targets[i]."""
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True)
    if max_tokens:
        tokens = tokens[: max_tokens + 1]
    n_ctx = min(llm.n_ctx(), len(llm.input_ids))  # llama.cpp may pad the context; the Python buffers are not
    rows: list[np.ndarray] = []
    targets: list[int] = []
    for start in range(0, max(len(tokens) - 1, 0), n_ctx - 1):
        window = tokens[start : start + n_ctx]
        if len(window) < 2:
            break
        llm.reset()
        llm.eval(window)
        logits = np.array(llm.scores[: len(window) - 1], dtype=np.float32)
        rows.append(log_softmax(logits))
        targets.extend(window[1:])
    if not rows:
        raise ValueError("the held-out text is shorter than two tokens")
    return np.asarray(targets, dtype=np.int64), np.concatenate(rows)


def perplexity(targets: np.ndarray, logprobs: np.ndarray) -> float:
    nll = -logprobs[np.arange(len(targets)), targets]
    return float(np.exp(nll.mean()))


def kl_stats(ref: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Mean/max KL(ref || other) per position and top-1 agreement; both arrays are log-probs."""
    if ref.shape != other.shape:
        raise ValueError(f"log-prob shapes differ: {ref.shape} vs {other.shape} (different tokenizers?)")
    kl = (np.exp(ref.astype(np.float64)) * (ref.astype(np.float64) - other.astype(np.float64))).sum(axis=-1)
    kl = np.maximum(kl, 0.0)  # rounding can make a zero a tiny negative
    return {
        "kl_div": float(kl.mean()),
        "kl_div_p99": float(np.percentile(kl, 99)),
        "kl_div_max": float(kl.max()),
        "top1_agreement": float((ref.argmax(-1) == other.argmax(-1)).mean()),
    }


def compare(
    ref_model: Path | str, model: Path | str, text: str, n_ctx: int = 512, threads: int | None = None
) -> dict[str, float]:
    """Perplexity of both models on `text` and the KL-divergence of `model` against `ref_model` (in-process)."""
    out: dict[str, float] = {}
    lps = []
    for label, path in (("ref", ref_model), ("model", model)):
        llm = load_llama(path, n_ctx, threads, logits_all=True)
        try:
            targets, lp = token_logprobs(llm, text)
        finally:
            llm.close()
        out[f"{label}_ppl"] = perplexity(targets, lp)
        lps.append(lp)
    out.update(kl_stats(lps[0], lps[1]))
    return out


def save_logprobs(path: Path, targets: np.ndarray, logprobs: np.ndarray) -> None:
    np.save(path.with_suffix(".targets.npy"), targets)
    np.save(path, logprobs)


def load_logprobs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(path.with_suffix(".targets.npy")), np.load(path, mmap_mode="r")
