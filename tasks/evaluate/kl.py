"""Perplexity and KL-divergence as llama.cpp's `llama-perplexity --kl-divergence` computes them, in row chunks.

The numbers users compare quantizations by come from `llama-perplexity`; to be put next to them, ours are made
the same way (tools/perplexity/perplexity.cpp of the runtime's llama.cpp commit):

- Windows: the held-out text is tokenized once (with BOS), cut into `n_chunk = n_tokens // n_ctx` chunks of
  `n_ctx` tokens (the remainder is dropped); each chunk starts from an empty KV cache with its first token
  replaced by BOS, and only its second half is scored: the logits at positions `n_ctx//2 .. n_ctx-2` predict
  the next token, `n_ctx - 1 - n_ctx//2` tokens per chunk.
- The reference (F16) log-probabilities are kept as llama-perplexity keeps them in its `--kl-divergence-base`
  file: per scored token, two float32 (scale, minimum log-prob) and one uint16 per vocabulary entry,
  covering the 16 nats below the most likely token. Our reference file IS that format (`BaseFile`), so
  `llama-perplexity --kl-divergence --kl-divergence-base <ours>` reads it.
- Per token: NLL = max + log-sum-exp - logit[target]; KLD = sum over the reference entries above -16 nats of
  p_ref (log p_ref - log p_q); same top token when both argmaxes agree. Mean KLD with its standard error
  sqrt((E[x^2] - E[x]^2)/(n-1)), the 99th percentile (linear interpolation), same-top % with
  sqrt(p(1-p)/(n-1)), and ln(PPL(Q)/PPL(ref)) with the covariance term, as the tool prints them.

Memory: nothing here holds more than one chunk's rows; rows are processed in blocks of `ROW_BLOCK` (float32
temporaries of ROW_BLOCK x n_vocab), sums are float64 scalars, and one float32 per scored token is kept for
the percentile. No full [tokens x vocab] matrix, float64 or otherwise, ever exists.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

#: llama-perplexity keeps reference log-probs within this many nats of the most likely token.
LOG_PROB_RANGE = 16.0
#: Rows processed at once (temporaries are ROW_BLOCK x n_vocab float32: 20 MB for a 152k vocabulary).
ROW_BLOCK = 32
MAGIC = b"_logits_"


def row_width(n_vocab: int) -> int:
    """uint16 values per scored token in a base file: 4 (two float32) + the vocabulary, padded to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def first_scored(n_ctx: int) -> int:
    return n_ctx // 2


def scored_per_chunk(n_ctx: int) -> int:
    return n_ctx - 1 - first_scored(n_ctx)


def _blocks(n: int, size: int = ROW_BLOCK) -> Iterator[slice]:
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def _max_lse(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: max logit (float32) and log(sum exp(x - max)) (summed in float64, rounded to float32)."""
    mx = logits.max(axis=1)
    sum_exp = np.exp(logits - mx[:, None]).sum(axis=1, dtype=np.float64)
    return mx, np.log(sum_exp).astype(np.float32)


def encode_base(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows as uint16 [n, row_width], NLL per row) for reference logits [n, n_vocab] (float32), as llama-perplexity."""
    n, n_vocab = logits.shape
    out = np.zeros((n, row_width(n_vocab)), dtype=np.uint16)
    nll = np.empty(n, dtype=np.float64)
    for b in _blocks(n):
        x = np.ascontiguousarray(logits[b], dtype=np.float32)
        mx, lse = _max_lse(x)
        mn = np.maximum(x.min(axis=1), mx - np.float32(LOG_PROB_RANGE))
        min_log_prob = (mn - mx - lse).astype(np.float32)
        scale = ((mx - mn) / np.float32(65535.0)).astype(np.float32)
        header = np.stack([scale, min_log_prob], axis=1).astype(np.float32).view(np.uint16)
        out[b, :4] = header
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(scale > 0, np.float32(1.0) / scale, np.float32(0.0)).astype(np.float32)
            q = np.rint(inv[:, None] * (x - mn[:, None]))
        q = np.where(x > mn[:, None], q, 0)
        out[b, 4 : 4 + n_vocab] = np.clip(q, 0, 65535).astype(np.uint16)
        rows = np.arange(x.shape[0])
        nll[b] = mx.astype(np.float64) + lse.astype(np.float64) - x[rows, targets[b]].astype(np.float64)
    return out, nll


def nll_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each row's target (float64), in row blocks."""
    out = np.empty(len(targets), dtype=np.float64)
    for b in _blocks(len(targets)):
        x = np.ascontiguousarray(logits[b], dtype=np.float32)
        mx, lse = _max_lse(x)
        out[b] = (mx + lse - x[np.arange(x.shape[0]), targets[b]]).astype(np.float64)
    return out


@dataclass
class KlSums:
    """Running sums over scored tokens (llama-perplexity's kl_divergence_result) and the per-token KLDs."""

    count: int = 0
    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    sum_nll_base: float = 0.0
    sum_nll_base2: float = 0.0
    sum_nll_nll_base: float = 0.0
    sum_kld: float = 0.0
    sum_kld2: float = 0.0
    n_same_top: int = 0
    kld_values: list[np.ndarray] = field(default_factory=list)

    def add(self, logits: np.ndarray, base_rows: np.ndarray, targets: np.ndarray) -> None:
        """Score one chunk's rows of a model's logits [n, n_vocab] against the reference rows [n, row_width]."""
        n, n_vocab = logits.shape
        for b in _blocks(n):
            x = np.ascontiguousarray(logits[b], dtype=np.float32)
            rows = np.arange(x.shape[0])
            tok = targets[b]
            mx, lse = _max_lse(x)
            imax = x.argmax(axis=1)
            nll = (mx + lse - x[rows, tok]).astype(np.float32)
            header = np.ascontiguousarray(base_rows[b, :4]).view(np.float32)
            scale, min_lp = header[:, 0], header[:, 1]
            plog = scale[:, None] * base_rows[b, 4 : 4 + n_vocab].astype(np.float32) + min_lp[:, None]
            nll_base = -(plog[rows, tok])
            terms = np.exp(plog) * (plog - x + (mx + lse)[:, None])
            kld = np.where(plog > -LOG_PROB_RANGE, terms, 0).sum(axis=1, dtype=np.float64)
            nll64, base64 = nll.astype(np.float64), nll_base.astype(np.float64)
            self.count += x.shape[0]
            self.sum_nll += float(nll64.sum())
            self.sum_nll2 += float((nll64 * nll64).sum())
            self.sum_nll_base += float(base64.sum())
            self.sum_nll_base2 += float((base64 * base64).sum())
            self.sum_nll_nll_base += float((nll64 * base64).sum())
            self.sum_kld += float(kld.sum())
            self.sum_kld2 += float((kld * kld).sum())
            self.n_same_top += int((imax == plog.argmax(axis=1)).sum())
            self.kld_values.append(kld.astype(np.float32))

    def report(self) -> dict[str, float]:
        """What `llama-perplexity --kl-divergence` prints, under this project's names."""
        n = self.count
        if n < 2:
            raise ValueError("KL-divergence needs at least two scored tokens")
        log_ppl, log_ppl_se = mean_and_uncertainty(self.sum_nll, self.sum_nll2, n)
        log_base, log_base_se = mean_and_uncertainty(self.sum_nll_base, self.sum_nll_base2, n)
        cov = covariance(self.sum_nll, self.sum_nll_base, self.sum_nll_nll_base, n)
        ratio = log_ppl - log_base
        ratio_se = math.sqrt(max(log_ppl_se**2 + log_base_se**2 - 2.0 * cov, 0.0))
        kl, kl_se = mean_and_uncertainty(self.sum_kld, self.sum_kld2, n)
        values = np.sort(np.concatenate(self.kld_values))
        top = self.n_same_top / n
        return {
            "kl_div": kl,
            "kl_div_se": kl_se,
            "kl_div_p99": percentile(values, 0.99),
            "kl_div_median": percentile(values, 0.5),
            "kl_div_max": float(values[-1]),
            "top1_agreement": top,
            "top1_agreement_se": math.sqrt(top * (1 - top) / (n - 1)),
            "ppl": math.exp(log_ppl),
            "ppl_se": math.exp(log_ppl) * log_ppl_se,
            "ref_ppl": math.exp(log_base),
            "ln_ppl_ratio": ratio,
            "ln_ppl_ratio_se": ratio_se,
            "ppl_ratio": math.exp(ratio),
            "ppl_ratio_se": math.exp(ratio) * ratio_se,
            "scored_tokens": n,
        }


def mean_and_uncertainty(total: float, total2: float, n: int) -> tuple[float, float]:
    """Mean and its standard error, as llama-perplexity computes them (zero error below 11 values)."""
    if n < 1:
        return 0.0, 0.0
    f = total / n
    var = total2 / n - f * f
    return f, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def covariance(a: float, b: float, ab: float, n: int) -> float:
    if n < 10:
        return 0.0
    return (ab / n - (a / n) * (b / n)) / (n - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile: linear interpolation at fraction * (n - 1)."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (len(sorted_values) - 1)
    i = int(p)
    p -= i
    return float((1 - p) * sorted_values[i] + p * sorted_values[min(i + 1, len(sorted_values) - 1)])


def ppl_stats(sum_nll: float, sum_nll2: float, n: int) -> dict[str, float]:
    """Perplexity and its uncertainty from NLL sums (llama-perplexity's `Final estimate: PPL = x +/- y`)."""
    mean, se = mean_and_uncertainty(sum_nll, sum_nll2, n)
    return {"ppl": math.exp(mean), "ppl_se": math.exp(mean) * se, "scored_tokens": n}


# --- the reference file (llama-perplexity's --kl-divergence-base format) --------------------------------------


@dataclass(frozen=True)
class BaseHeader:
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray  # int32 [n_chunk * n_ctx], as tokenized (not BOS-replaced)

    @property
    def data_offset(self) -> int:
        return 8 + 4 + 4 + 4 + 4 * self.n_chunk * self.n_ctx

    @property
    def chunk_bytes(self) -> int:
        return scored_per_chunk(self.n_ctx) * row_width(self.n_vocab) * 2

    def file_size(self) -> int:
        return self.data_offset + self.n_chunk * self.chunk_bytes


class BaseWriter:
    """Write a reference file chunk by chunk (the header, with every token, first)."""

    def __init__(self, fh: BinaryIO, header: BaseHeader):
        self.fh, self.header, self.written = fh, header, 0
        fh.write(MAGIC + struct.pack("<Iii", header.n_ctx, header.n_vocab, header.n_chunk))
        fh.write(np.ascontiguousarray(header.tokens, dtype="<i4").tobytes())

    def add_chunk(self, rows: np.ndarray) -> None:
        if rows.shape != (scored_per_chunk(self.header.n_ctx), row_width(self.header.n_vocab)):
            want = (scored_per_chunk(self.header.n_ctx), row_width(self.header.n_vocab))
            raise ValueError(f"chunk rows have shape {rows.shape}, the file needs {want}")
        self.fh.write(np.ascontiguousarray(rows, dtype="<u2").tobytes())
        self.written += 1


def read_base_header(path: Path) -> BaseHeader:
    with open(path, "rb") as fh:
        head = fh.read(20)
        if len(head) < 20 or head[:8] != MAGIC:
            raise ValueError(f"{path} is not a llama-perplexity log-probability file")
        n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", head[8:20])
        tokens = np.frombuffer(fh.read(4 * n_ctx * n_chunk), dtype="<i4").astype(np.int32)
    header = BaseHeader(n_ctx, n_vocab, n_chunk, tokens)
    if len(tokens) != n_ctx * n_chunk or path.stat().st_size < header.file_size():
        raise ValueError(f"{path} is truncated ({path.stat().st_size} bytes, needs {header.file_size()})")
    return header


def iter_base_chunks(path: Path, header: BaseHeader) -> Iterator[np.ndarray]:
    """Each chunk's reference rows [scored, row_width] uint16, read with plain reads (no memory map: the pages
    of a mapped multi-GB file would count as this process's resident memory)."""
    shape = (scored_per_chunk(header.n_ctx), row_width(header.n_vocab))
    buf = np.empty(shape, dtype="<u2")
    with open(path, "rb") as fh:
        fh.seek(header.data_offset)
        for _ in range(header.n_chunk):
            if fh.readinto(memoryview(buf).cast("B")) != header.chunk_bytes:
                raise ValueError(f"{path} ends early")
            yield buf
