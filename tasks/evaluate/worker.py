"""One quant's evaluation, in its own process: `python -m tasks.evaluate.worker job.json result.json`.

A child process per quant makes peak memory measurable (the process's max RSS covers exactly one model)
and keeps one model's memory from piling onto the next. It generates an answer for every eval sample
(latency, tokens/s, exact/contains match), then scores the held-out text (perplexity) and, against the
F16 log-probabilities saved by the F16 worker, the KL-divergence. Results go to result.json.
"""

from __future__ import annotations

import json
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tasks.evaluate.kl import kl_stats, load_llama, load_logprobs, perplexity, save_logprobs, token_logprobs


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


def score(job: dict[str, Any]) -> dict[str, Any]:
    llm = load_llama(job["model"], job["n_ctx"], job.get("threads"), logits_all=True)
    try:
        targets, lp = token_logprobs(llm, job["heldout_text"], job.get("max_heldout_tokens"))
    finally:
        llm.close()
    out: dict[str, Any] = {"ppl": perplexity(targets, lp), "heldout_tokens": int(len(targets))}
    if job.get("save_logprobs"):
        save_logprobs(Path(job["save_logprobs"]), targets, lp)
    if job.get("ref_logprobs"):
        ref_targets, ref_lp = load_logprobs(Path(job["ref_logprobs"]))
        if not np.array_equal(ref_targets, targets):
            raise SystemExit(
                f"{job['model']} tokenizes the held-out text differently from the F16 GGUF: KL-divergence is undefined"
            )
        out.update(kl_stats(np.asarray(ref_lp), lp))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    job = json.loads(Path(argv[0]).read_text())
    t0 = time.perf_counter()
    after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result: dict[str, Any] = {
        "quant": job["quant"],
        "model": job["model"],
        "rss_after_imports_mb": round(after_imports, 1),
    }
    result.update(generate(job))
    if job.get("heldout_text"):
        result.update(score(job))
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    Path(argv[1]).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
