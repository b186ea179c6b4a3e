"""Stage 11, eval: compare the quantizations against each other and against the unquantized GGUF.

For every GGUF (and optionally a second model version, `evaluation.compare_gguf`) a child process
(tasks/evaluate/worker.py) answers the eval samples (eval_samples.jsonl: prompt, reference, optional
metric exact|contains) and measures latency p50/p95, tokens/s, accuracy and peak memory, then scores a
held-out text the way `llama-perplexity` does (tasks/evaluate/kl.py, tasks/evaluate/windows.py): the reference
(the unquantized GGUF convert wrote: F16, or BF16/F32 as `convert.outtype` says) first, writing its
log-probabilities in llama-perplexity's `--kl-divergence-base` format, then each quant against that file:
perplexity, mean KL-divergence with its standard error, 99th percentile, same-top-token rate and the perplexity
ratio. Everything is done chunk by chunk, so memory does not grow with the text.

The report (reports/eval/: eval.json, eval.md, quality_vs_size.png) is the `report:eval` artifact; its
`meta.quants` maps each quant to {ppl, ppl_delta, ppl_ratio, kl_div, kl_div_se, kl_div_p99, top1_agreement,
tokens_per_s, accuracy, latency_p50_ms, latency_p95_ms, peak_rss_mb, size_mb}: the model card's quant table
reads it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_dir
from tasks.core.constants import PROJECT_ROOT, TASKS_DATA
from tasks.core.errors import PermanentError
from tasks.core.hashing import digest_of
from tasks.core.progress import Progress
from tasks.core.settings import FILE_CONTENT, StrictModel
from tasks.core.stage import stage_task
from tasks.core.ui import artifact_key, publish_table
from tasks.core.vocab import ArtifactKind, Stage
from tasks.gguf import quant_types

STAGE = Stage.EVALUATE
DATA = TASKS_DATA
log = logging.getLogger("loraship.evaluate")


class EvalSettings(StrictModel):
    """What to evaluate and how."""

    samples: Annotated[str | None, FILE_CONTENT] = Field(
        None,
        description=(
            "eval_samples.jsonl (prompt, reference, optional metric exact|contains); default: a small bundled "
            "set for the demo task. For a speech model: audio (a WAV path relative to the file, or base64) and "
            "reference (the transcript), scored by word error rate (tasks/evaluate/speech.py); no default"
        ),
    )
    heldout_text: Annotated[str | None, FILE_CONTENT] = Field(
        None, description="a text file for perplexity and KL-divergence; default: a bundled paragraph"
    )
    max_tokens: int = Field(32, ge=1, description="tokens generated per sample")
    default_metric: Literal["exact", "contains"] = Field("contains", description="metric for samples that name none")
    quants: list[str] | None = Field(None, description="quants to evaluate (None: every GGUF of the run)")
    compare_gguf: Annotated[str | None, FILE_CONTENT] = Field(
        None, description="a second model version's GGUF to evaluate alongside (row 'compare')"
    )
    n_ctx: int = Field(512, ge=16, description="context window for generation (and the perplexity windows)")
    ppl_ctx: int | None = Field(
        None,
        ge=16,
        description=(
            "window for perplexity and KL-divergence (llama-perplexity's -c); None: n_ctx. A text shorter than "
            "two windows is scored in windows of half its length"
        ),
    )
    max_heldout_tokens: int | None = Field(
        4096,
        ge=32,
        description=(
            "cap on held-out tokens scored (None: all). Memory does not grow with it; the F16 reference file on "
            "disk takes about n_tokens/2 x n_vocab x 2 bytes"
        ),
    )
    threads: int | None = Field(
        None, ge=1, description="inference threads (None: llama.cpp's default; torch's for a speech model)"
    )
    worker_timeout_s: float = Field(1800.0, gt=0, description="per-quant time limit")

    @field_validator("quants")
    @classmethod
    def _known_quants(cls, v: list[str] | None) -> list[str] | None:
        return quant_types.check_quants(v)


def load_samples(settings: EvalSettings) -> list[dict[str, Any]]:
    path = Path(settings.samples).expanduser() if settings.samples else DATA / "eval_samples.jsonl"
    if not path.is_file():
        raise PermanentError(
            f"evaluation.samples {path} does not exist",
            hint='point it at a JSONL file with one {"prompt": ..., "reference": ...} per line',
        )
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise PermanentError(f"{path}:{n}: not JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise PermanentError(
                f'{path}:{n}: needs a "prompt" string',
                hint='{"prompt": "...", "reference": "...", "metric": "contains"}',
            )
        if row.get("metric") not in (None, "exact", "contains"):
            raise PermanentError(f"{path}:{n}: metric {row['metric']!r} is not exact or contains")
        out.append(row)
    if not out:
        raise PermanentError(f"evaluation.samples {path} has no samples")
    return out


def load_heldout(settings: EvalSettings) -> str:
    path = Path(settings.heldout_text).expanduser() if settings.heldout_text else DATA / "heldout.txt"
    if not path.is_file():
        raise PermanentError(
            f"evaluation.heldout_text {path} does not exist",
            hint="point it at a plain text file the model was not trained on",
        )
    return path.read_text()


def data_digest(settings: EvalSettings) -> str:
    """Digest of the sample and held-out files' contents (part of the cache key: a path alone is not)."""
    return digest_of([load_samples(settings), load_heldout(settings)])


def _run_worker(job: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    job_path = work / f"job-{job['quant']}.json"
    result_path = work / f"result-{job['quant']}.json"
    job_path.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.evaluate.worker", str(job_path), str(result_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0 or not result_path.is_file():
        raise PermanentError(
            f"evaluating {job['quant']} ({job['model']}) failed (rc {proc.returncode}): {proc.stderr.strip()[-800:]}"
        )
    return json.loads(result_path.read_text())


def reference_of(quants: list[str]) -> str | None:
    """The KL reference among `quants`: the unquantized GGUF the convert stage wrote (F16, BF16 or F32 as
    `convert.outtype` says; the most precise if several), None when only quantizations were evaluated."""
    floats = [q for q in quants if quant_types.is_float(q)]
    return min(floats, key=quant_types.precision_key) if floats else None


def _order(q: str, ref: str | None) -> tuple[bool, tuple[float, int, str]]:
    """The reference first, since its logprobs feed the others' KL; then the most precise types first."""
    return (q != ref, quant_types.precision_key(q))


def run_eval(ggufs: list[Artifact], settings: EvalSettings, work: Path) -> dict[str, dict[str, Any]]:
    """Evaluate each GGUF in a child process, the reference (`reference_of`) first; returns quant -> results."""
    by_quant = {str(a.meta.get("quant")): a for a in ggufs}
    if settings.quants:
        missing = [q for q in settings.quants if q not in by_quant]
        if missing:
            raise PermanentError(f"evaluation.quants {missing} were not made in this run (made: {', '.join(by_quant)})")
        by_quant = {q: by_quant[q] for q in settings.quants}
        made_ref = reference_of([str(a.meta.get("quant")) for a in ggufs])
        if made_ref is not None:
            by_quant.setdefault(made_ref, next(a for a in ggufs if str(a.meta.get("quant")) == made_ref))
    samples, heldout = load_samples(settings), load_heldout(settings)
    ref = reference_of(list(by_quant))
    order = sorted(by_quant, key=lambda q: _order(q, ref))
    base = {
        "samples": samples,
        "heldout_text": heldout,
        "max_tokens": settings.max_tokens,
        "default_metric": settings.default_metric,
        "n_ctx": settings.n_ctx,
        "threads": settings.threads,
        "max_heldout_tokens": settings.max_heldout_tokens,
        "ppl_ctx": settings.ppl_ctx or settings.n_ctx,
    }
    ref_lp = work / "reference-logprobs.kld" if ref is not None else None
    if ref_lp is None:
        log.warning("no unquantized (F16/BF16/F32) GGUF in this run: perplexity is reported, KL-divergence is not")
    jobs = [(q, str(by_quant[q].local_path), by_quant[q].size) for q in order]
    if settings.compare_gguf:
        p = Path(settings.compare_gguf).expanduser()
        if not p.is_file():
            raise PermanentError(f"evaluation.compare_gguf {p} does not exist")
        jobs.append(("compare", str(p.resolve()), p.stat().st_size))
    results: dict[str, dict[str, Any]] = {}
    with Progress("evaluate quants", len(jobs), unit="quant") as progress:
        for q, path, size in jobs:
            job = {**base, "quant": q, "model": path}
            if q == ref:
                job["save_logprobs"] = str(ref_lp)
            elif ref_lp is not None and q != "compare":
                job["ref_logprobs"] = str(ref_lp)
            log.info("evaluating %s (%s)", q, Path(path).name)
            res = _run_worker(job, work, settings.worker_timeout_s)
            res["size_mb"] = round(size / 1e6, 3)
            results[q] = res
            progress.advance(1)
    if ref is not None and ref in results:
        ref_ppl = results[ref]["ppl"]
        for r in results.values():
            if "ppl" in r:
                r["ppl_delta"] = r["ppl"] - ref_ppl
        results[ref].update(kl_div=0.0, kl_div_se=0.0, kl_div_p99=0.0, top1_agreement=1.0, ppl_ratio=1.0)
    return results


TABLE_KEYS = (
    "size_mb",
    "ppl",
    "ppl_delta",
    "ppl_ratio",
    "kl_div",
    "kl_div_se",
    "kl_div_p99",
    "top1_agreement",
    "accuracy",
    "tokens_per_s",
    "latency_p50_ms",
    "latency_p95_ms",
    "peak_rss_mb",
)


def quant_table(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    def r(v: Any) -> Any:
        return round(v, 6) if isinstance(v, float) else v

    return {q: {k: r(res.get(k)) for k in TABLE_KEYS} for q, res in results.items()}


def to_markdown(
    model: str,
    table: dict[str, dict[str, Any]],
    n_samples: int,
    heldout_tokens: int | None,
    ppl_ctx: int | None = None,
    reference: str | None = "F16",
) -> str:
    windows = (
        f" in windows of {ppl_ctx} (the second half of each scored, as `llama-perplexity -c {ppl_ctx} --kl-divergence`)"
        if ppl_ctx
        else ""
    )
    lines = [
        f"# Evaluation of {model}",
        "",
        f"{n_samples} eval samples; perplexity and KL-divergence against {reference} on {heldout_tokens} "
        "held-out tokens"
        f"{windows}.",
        "",
    ]
    lines += ["| quant | " + " | ".join(TABLE_KEYS) + " |", "| --- | " + " | ".join("---:" for _ in TABLE_KEYS) + " |"]
    for q, row in table.items():
        lines.append(
            f"| {q} | "
            + " | ".join(
                "" if row[k] is None else (f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]))
                for k in TABLE_KEYS
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot(table: dict[str, dict[str, Any]], path: Path, model: str, reference: str | None = "F16") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    qs = [q for q in table if table[q].get("ppl") is not None]
    xs = [table[q]["size_mb"] for q in qs]
    ax.scatter(xs, [table[q]["ppl"] for q in qs], color="tab:blue", label="perplexity")
    for q, x in zip(qs, xs):
        ax.annotate(q, (x, table[q]["ppl"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("perplexity on held-out text (lower is better)")
    kq = [q for q in qs if table[q].get("kl_div") is not None]
    if kq:
        ax2 = ax.twinx()
        ax2.plot(
            [table[q]["size_mb"] for q in kq],
            [table[q]["kl_div"] for q in kq],
            "o--",
            color="tab:red",
            label=f"KL vs {reference}",
        )
        ax2.set_ylabel(f"mean KL-divergence vs {reference}", color="tab:red")
    ax.set_title(f"{model}: quality against file size")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate(ggufs: list[Artifact], settings: EvalSettings, out_dir: Path, model: str) -> Artifact:
    """Evaluate every GGUF; write out_dir/{eval.json,eval.md,quality_vs_size.png}; return `report:eval`."""
    if not ggufs:
        raise PermanentError("no GGUF files to evaluate", hint="run the convert/quantize stages first")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # beside the report, not in /tmp: the reference's log-probabilities grow with the held-out text and the vocabulary
    with tempfile.TemporaryDirectory(prefix=".eval-work-", dir=out_dir.parent) as work:
        results = run_eval(ggufs, settings, Path(work))
    table = quant_table(results)
    heldout_tokens = next((r.get("heldout_tokens") for r in results.values() if r.get("heldout_tokens")), None)
    measured_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")  # the nightly run re-measures
    report = {
        "model": model,
        "measured_at": measured_at,
        "quants": table,
        "results": results,
        "settings": settings.model_dump(mode="json"),
        "note": "timings were measured one quant after another on this machine; CPU load from other work changes them",
    }
    ppl_ctx = next((r.get("ppl_ctx") for r in results.values() if r.get("ppl_ctx")), None)
    reference = reference_of(list(results))
    report["reference"] = reference
    md = to_markdown(model, table, len(load_samples(settings)), heldout_tokens, ppl_ctx, reference)
    md += f"\nMeasured {measured_at}.\n"
    with atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)
        (tmp / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "eval.md").write_text(md)
        plot(table, tmp / "quality_vs_size.png", model, reference)
    rows = [{"quant": q, **row} for q, row in table.items()]
    publish_table(artifact_key("eval", model), rows, f"Quantization comparison of {model}")
    return Artifact.from_path(
        out_dir,
        name="report:eval",
        kind=ArtifactKind.REPORT,
        stage=STAGE,
        inputs=ggufs,
        settings=settings,
        tools=["llama-cpp-python", "numpy"],
        meta={
            "quants": table,
            "measured_at": measured_at,
            "heldout_tokens": heldout_tokens,
            "ppl_ctx": ppl_ctx,
            "reference": reference,
            "samples": len(load_samples(settings)),
            "json": str(out_dir / "eval.json"),
            "markdown": str(out_dir / "eval.md"),
            "plot": str(out_dir / "quality_vs_size.png"),
        },
    )


@stage_task(STAGE)
def evaluate_task(
    ggufs: list[Artifact], settings: EvalSettings, out_dir: Path, model: str, data_digest: str
) -> Artifact:
    """`data_digest` (of the sample and held-out files) is only there to key the cache on their content."""
    return evaluate(ggufs, settings, out_dir, model)
