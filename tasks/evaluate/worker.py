"""One quant's evaluation, in its own process: `python -m tasks.evaluate.worker job.json result.json`.

A child process per quant makes peak memory measurable (the process's max RSS covers exactly one model)
and keeps one model's memory from piling onto the next. It generates an answer for every eval sample
(latency, tokens/s, exact/contains match), then scores the held-out text chunk by chunk as llama-perplexity
does: the F16 worker writes its log-probabilities in llama-perplexity's base-file format, each quant's worker
reads them back one chunk at a time for the KL-divergence. Results go to result.json.
"""

from __future__ import annotations

import contextlib
import json
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.disk import disk_preflight
from tasks.core.errors import PermanentError
from tasks.evaluate.kl import (
    BaseHeader,
    BaseWriter,
    KlSums,
    encode_base,
    iter_base_chunks,
    ppl_stats,
    read_base_header,
)
from tasks.evaluate.windows import ChunkDecoder, Windows, load_llama, plan_windows, tokenize


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .!?")


def matches(answer: str, reference: str, metric: str) -> bool:
    a, r = normalize(answer), normalize(reference)
    return a == r if metric == "exact" else (r in a)


def generate(job: dict[str, Any]) -> dict[str, Any]:
    llm = load_llama(job["model"], job["n_ctx"], job.get("threads"))
    rows = []
    try:
        for s in job["samples"]:
            t0 = time.perf_counter()
            r = llm.create_chat_completion(
                messages=[{"role": "user", "content": s["prompt"]}],
                max_tokens=job["max_tokens"],
                temperature=0.0,
                seed=0,
            )
            dt = time.perf_counter() - t0
            answer = r["choices"][0]["message"].get("content") or ""
            metric = s.get("metric") or job["default_metric"]
            rows.append(
                {
                    "prompt": s["prompt"],
                    "reference": s.get("reference", ""),
                    "answer": answer,
                    "metric": metric,
                    "correct": matches(answer, s.get("reference", ""), metric) if s.get("reference") else None,
                    "latency_ms": round(dt * 1000, 2),
                    "tokens": r["usage"]["completion_tokens"],
                }
            )
    finally:
        llm.close()
    lat = np.array([r["latency_ms"] for r in rows]) if rows else np.array([0.0])
    graded = [r["correct"] for r in rows if r["correct"] is not None]
    total_s = sum(r["latency_ms"] for r in rows) / 1000
    return {
        "samples": rows,
        "latency_p50_ms": round(float(np.percentile(lat, 50)), 2),
        "latency_p95_ms": round(float(np.percentile(lat, 95)), 2),
        "tokens_per_s": round(sum(r["tokens"] for r in rows) / total_s, 1) if total_s > 0 else None,
        "accuracy": round(sum(graded) / len(graded), 4) if graded else None,
    }


def tokenize_text(model: str, text: str, max_tokens: int | None = None) -> list[int]:
    """The model's tokens for `text` (its vocabulary only is loaded: cheap)."""
    llm = load_llama(model, 16, vocab_only=True)
    try:
        tokens = tokenize(llm, text)
    finally:
        llm.close()
    return tokens[:max_tokens] if max_tokens else tokens


def score_reference(
    model: str,
    text: str,
    n_ctx: int,
    out: Path | None,
    threads: int | None = None,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Perplexity of the reference model; with `out`, also its log-probabilities in llama-perplexity's base format."""
    windows = plan_windows(tokenize_text(model, text, max_tokens), n_ctx)
    sum_nll = sum_nll2 = 0.0
    count = 0
    with ChunkDecoder(model, windows.n_ctx, threads) as dec:
        used = windows.tokens[: windows.n_chunk * windows.n_ctx]
        header = BaseHeader(windows.n_ctx, dec.n_vocab, windows.n_chunk, used)
        if out is not None:
            try:
                what, hint = "the F16 reference log-probabilities", "lower evaluation.max_heldout_tokens"
                disk_preflight(out.parent, header.file_size(), what, hint=hint)
            except PermanentError as exc:  # this is the worker process: its exit message reaches the stage
                raise SystemExit(str(exc)) from None
        with open(out, "wb") if out else contextlib.nullcontext() as fh:
            writer = BaseWriter(fh, header) if fh else None
            for _, logits, targets in dec.scored(windows):
                rows, nll = encode_base(logits, targets)
                if writer:
                    writer.add_chunk(rows)
                sum_nll += float(nll.sum())
                sum_nll2 += float((nll * nll).sum())
                count += len(nll)
    return {**ppl_stats(sum_nll, sum_nll2, count), **_window_info(windows)}


def score_against(model: str, ref_file: Path, threads: int | None = None) -> dict[str, Any]:
    """Perplexity and KL-divergence of `model` against a reference file, on exactly the reference's tokens."""
    header = read_base_header(ref_file)
    with ChunkDecoder(model, header.n_ctx, threads) as dec:
        if dec.n_vocab != header.n_vocab:
            raise SystemExit(f"{model} has {dec.n_vocab} vocabulary entries, the F16 GGUF {header.n_vocab}")
        # the reference's tokens are what is scored; the model must tokenize the text the same way
        windows = Windows(header.tokens, header.n_ctx, header.n_chunk)
        sums = KlSums()
        for (_, logits, targets), base_rows in zip(dec.scored(windows), iter_base_chunks(ref_file, header)):
            sums.add(logits, base_rows, targets)
    return {**sums.report(), **_window_info(windows)}


def _window_info(w: Windows) -> dict[str, Any]:
    return {"ppl_ctx": w.n_ctx, "ppl_chunks": w.n_chunk, "heldout_tokens": w.n_chunk * w.n_ctx}


def score(job: dict[str, Any]) -> dict[str, Any]:
    text, n_ctx, threads = job["heldout_text"], job.get("ppl_ctx") or job["n_ctx"], job.get("threads")
    if job.get("ref_logprobs"):
        ref = Path(job["ref_logprobs"])
        header = read_base_header(ref)
        tokens = np.asarray(tokenize_text(job["model"], text, job.get("max_heldout_tokens")), dtype=np.int32)
        if not np.array_equal(tokens[: len(header.tokens)], header.tokens):
            raise SystemExit(
                f"{job['model']} tokenizes the held-out text differently from the F16 GGUF: KL-divergence is undefined"
            )
        return score_against(job["model"], ref, threads)
    out = Path(job["save_logprobs"]) if job.get("save_logprobs") else None
    return score_reference(job["model"], text, n_ctx, out, threads, job.get("max_heldout_tokens"))


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: /proc's VmHWM (this program's own, from its exec on).

    getrusage's ru_maxrss would do elsewhere, but Linux carries it across fork+exec: every worker would report
    at least the RSS of the flow process that started it (589 MB in the demo, for a 3 MB model).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    job = json.loads(Path(argv[0]).read_text())
    t0 = time.perf_counter()
    after_imports = peak_rss_mb()
    result: dict[str, Any] = {
        "quant": job["quant"],
        "model": job["model"],
        "rss_after_imports_mb": round(after_imports, 1),
    }
    result.update(generate(job))
    if job.get("heldout_text"):
        result.update(score(job))
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["peak_rss_mb"] = peak_rss_mb()
    Path(argv[1]).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
