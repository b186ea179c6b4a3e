"""Issue 15: the evaluate stage on a model with a 151,936-token vocabulary, side by side with llama-perplexity.

    python -m benchmarks.eval_bench            # default settings, the default cap (4096 tokens), 32k tokens uncapped
    python -m benchmarks.eval_bench --quick    # default settings only

The vocabulary is what makes an evaluation big (every scored token has 151,936 logits), so the model is small
otherwise: a Qwen2-style model (hidden 256, 2 layers, tied embeddings) whose byte-level BPE tokenizer, trained
here, is padded to Qwen2.5's 151,936 entries (tasks/support/tiny_models.pad_vocabulary), converted and
quantized by the project's own stages (F16, Q8_0, Q5_K_M, Q4_K_M; cached). Contenders, each in its own child
process (benchmarks/harness.measure: wall, CPU, peak RSS and peak anonymous memory of the process tree):

- the evaluate stage with default settings (EvalSettings(): the bundled samples and held-out text);
- the same with a long held-out text, capped at the default 4096 tokens, and uncapped (about 32k tokens, 8x as
  many): memory must not grow with the text (tests/test_eval.py scores 100k+ tokens on the small fixture);
- llama.cpp's `llama-perplexity` doing the same KL-divergence on the same files, text and context (the F16
  base file, then each quant against it): what a user would otherwise run. It computes only perplexity and
  KL; the stage also answers the eval samples (latency, tokens/s, accuracy).

Goal: the stage's peak RSS at most 1.5 GB + the largest GGUF. Results: benchmarks/results/eval_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import machine, measure, python, save, table

VOCAB = 151_936
MODEL = dict(arch="qwen2", hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, tie=True, pad_vocab_to=VOCAB)
QUANTS = ("Q8_0", "Q5_K_M", "Q4_K_M")
GOAL_MB = 1500


def bench_ggufs() -> dict[str, Path]:
    """{"F16": path, ...} for the 151,936-token model (built once into the cache)."""
    from tasks.core.artifacts import Artifact
    from tasks.core.constants import cache_root
    from tasks.gguf.convert import ConvertSettings, convert
    from tasks.gguf.quantize import QuantizeSettings, quantize_all
    from tasks.support.tiny_models import build_once, tiny_model

    base = tiny_model(**MODEL)

    def build(tmp: Path) -> None:
        merged = Artifact.from_path(base, name="merged", kind="merged", stage="merge")
        f16 = convert(merged, ConvertSettings(vocab_pre="qwen2"), tmp, "vocab152k")
        quants = quantize_all(f16, QuantizeSettings(types=list(QUANTS)), tmp, "vocab152k")
        index = {a.meta["quant"]: Path(a.path).name for a in [f16, *quants]}
        (tmp / "index.json").write_text(json.dumps(index, indent=2))

    out = build_once(cache_root() / "ggufs" / f"eval-bench-{base.name}", build, marker="index.json")
    return {q: out / f for q, f in json.loads((out / "index.json").read_text()).items()}


def long_text(path: Path, words: int = 14_000) -> Path:
    """Shuffled words of the bundled held-out text: about 32k tokens for this tokenizer, no download."""
    import numpy as np

    from tasks.core.constants import TASKS_DATA

    vocab = (TASKS_DATA / "heldout.txt").read_text().split()
    path.write_text(" ".join(np.random.default_rng(0).choice(vocab, words)) + "\n")
    return path


def child(ggufs: str, out: str, heldout: str | None, max_tokens: str | None) -> None:
    """The evaluate stage as the flow runs it."""
    from tasks.core.artifacts import Artifact
    from tasks.evaluate.evaluation import EvalSettings, evaluate

    files = {q: Path(p) for q, p in json.loads(ggufs).items()}
    arts = [
        Artifact.from_path(p, name=f"gguf:{q}", kind="gguf", stage="quantize", meta={"quant": q})
        for q, p in files.items()
    ]
    kw: dict[str, Any] = {}
    if heldout:
        kw["heldout_text"] = heldout
    if max_tokens:
        kw["max_heldout_tokens"] = None if max_tokens == "none" else int(max_tokens)
    art = evaluate(arts, EvalSettings(**kw), Path(out), "vocab152k")
    q = art.meta["quants"]
    print("RESULT " + json.dumps({k: {m: q[k].get(m) for m in ("ppl", "kl_div", "kl_div_se")} for k in q}))
    print("TOKENS " + json.dumps({"heldout_tokens": art.meta["heldout_tokens"], "ppl_ctx": art.meta["ppl_ctx"]}))


def llama_perplexity_script(ggufs: dict[str, Path], text: Path, work: Path, chunks: int | None) -> list[str]:
    from tasks.gguf.llama_tools import llama_tool

    tool = llama_tool("llama-perplexity", build=False)
    base = work / "lp-base.kld"
    lim = f"--chunks {chunks}" if chunks else ""
    lines = [f"{tool} -m {ggufs['F16']} -f {text} -c 512 {lim} --kl-divergence-base {base}"]
    lines += [f"{tool} -m {ggufs[q]} -c 512 --kl-divergence --kl-divergence-base {base}" for q in QUANTS]
    return ["bash", "-c", " && ".join(f"{line} 2>&1 | grep -E 'Final estimate|Mean +KLD'" for line in lines)]


def _stage_cmd(ggufs: dict[str, Path], out: Path, heldout: Path | None, max_tokens: str | None) -> list[str]:
    cmd = [
        python(),
        "-m",
        "benchmarks.eval_bench",
        "--child",
        "--ggufs",
        json.dumps({q: str(p) for q, p in ggufs.items()}),
    ]
    cmd += ["--out", str(out)]
    if heldout:
        cmd += ["--heldout", str(heldout)]
    if max_tokens:
        cmd += ["--max-tokens", max_tokens]
    return cmd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--ggufs")
    ap.add_argument("--out")
    ap.add_argument("--heldout")
    ap.add_argument("--max-tokens")
    ap.add_argument("--quick", action="store_true", help="the default-settings run only")
    args = ap.parse_args()
    if args.child:
        child(args.ggufs, args.out, args.heldout, args.max_tokens)
        return
    ggufs = bench_ggufs()
    largest_mb = max(p.stat().st_size for p in ggufs.values()) / 1e6
    work = Path(tempfile.mkdtemp(prefix="loraship-eval-bench-"))
    text = long_text(work / "long.txt")
    runs: list[tuple[str, list[str]]] = [
        ("evaluate stage, default settings", _stage_cmd(ggufs, work / "e1", None, None))
    ]
    if not args.quick:
        runs += [
            ("evaluate stage, long text, default cap 4096", _stage_cmd(ggufs, work / "e2", text, None)),
            ("evaluate stage, long text, no cap", _stage_cmd(ggufs, work / "e3", text, "none")),
            ("llama-perplexity KLD, same text, 4096 tokens", llama_perplexity_script(ggufs, text, work, 8)),
            ("llama-perplexity KLD, same text, no cap", llama_perplexity_script(ggufs, text, work, None)),
        ]
    rows = []
    try:
        for name, cmd in runs:
            r = measure(cmd, env={"TOKENIZERS_PARALLELISM": "false"}, timeout=7200)
            if r["returncode"]:
                print(f"!! {name} failed:\n{r['tail']}", file=sys.stderr)
            row = {
                "contender": name,
                **{k: r[k] for k in ("wall_s", "cpu_s", "peak_rss_mb", "peak_anon_mb", "returncode")},
            }
            for tag in ("RESULT", "TOKENS"):
                m = re.search(rf"^{tag} (.*)$", r["tail"], re.M)
                if m:
                    row[tag.lower()] = json.loads(m[1])
            kld = re.findall(r"Mean +KLD: +([\d.]+) ± +([\d.]+)", r["tail"])
            if kld:
                row["llama_perplexity_kld"] = dict(zip(QUANTS, [float(k) for k, _ in kld]))
                row["llama_perplexity_ppl_f16"] = float(re.search(r"PPL = ([\d.]+)", r["tail"])[1])
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    goal = GOAL_MB + largest_mb
    result = {
        "machine": machine(),
        "model": {**MODEL, "files_mb": {q: round(p.stat().st_size / 1e6, 1) for q, p in ggufs.items()}},
        "goal_peak_rss_mb": round(goal, 1),
        "rows": rows,
        "note": "2 CPU cores shared with other engineers' work while measured",
    }
    out = save("eval_bench", result)
    print(table(rows, ["contender", "wall_s", "cpu_s", "peak_rss_mb", "peak_anon_mb", "returncode"]))
    for r in rows:
        print(r["contender"], {k: r[k] for k in ("result", "tokens", "llama_perplexity_kld") if k in r})
    print(f"goal: peak RSS <= {goal:.0f} MB (1.5 GB + the largest GGUF, {largest_mb:.0f} MB); written: {out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
