"""Issue 8: the streaming merge against peft's merge_and_unload, side by side.

    python -m benchmarks.merge_bench              # 1.5 GB model, then the doubled 3.1 GB model
    python -m benchmarks.merge_bench --no-double  # the 1.5 GB model only

The model is a random bf16 Llama-style model (hidden 2048, intermediate 5632, 17 layers: 0.77B
parameters, 1.53 GB in 4 shards; doubled: 34 layers, 3.07 GB in 8 shards), built here from a config with
tasks/tiny_models and cached under ~/.cache/loraship, with an r=16 adapter on all linear layers.
Each contender runs in its own child process (benchmarks/harness.measure: wall time, peak RSS and peak
anonymous memory of the process tree); verification is off for both, so the numbers are the merge
alone. Results: a table on stdout and benchmarks/results/merge.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import LORA_TARGETS, bench_model, machine, measured_row, python, report, weights_size

MODEL = dict(
    arch="llama", hidden=2048, layers=17, heads=16, kv_heads=4, intermediate=5632, dtype="bfloat16", shard_size="400MB"
)
TARGETS = LORA_TARGETS


def bench_inputs(layers: int = 17) -> tuple[Path, Path]:
    return bench_model(MODEL, layers)


def contenders(base: Path, adapter: Path, work: Path) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, command, env) of each contender, for this script and benchmarks/pipeline_bench."""
    out = []
    for backend in ("streaming", "peft"):
        cmd = [
            python(),
            "-m",
            "benchmarks.merge_bench",
            "--child",
            backend,
            "--base",
            str(base),
            "--adapter",
            str(adapter),
            "--out",
            str(work / f"merged-{backend}"),
        ]
        out.append((f"merge: {backend}", cmd, {"TOKENIZERS_PARALLELISM": "false"}))
    return out


def child(backend: str, base: Path, adapter: Path, out: Path) -> None:
    """One merge, as the stage runs it (verification off: the merge alone is measured)."""
    from tasks.core.artifacts import Artifact
    from tasks.merge.stage import MergeSettings, merge

    art = Artifact.from_path(adapter, name="adapter", kind="adapter", stage="download")
    merged = merge(art, MergeSettings(backend=backend, base_model=str(base), verify="never"), out)
    print(json.dumps({"merge_seconds": merged.meta["merge_seconds"], "size": merged.size}))


def run_model(label: str, layers: int, work: Path) -> list[dict[str, Any]]:
    base, adapter = bench_inputs(layers)
    size, shards = weights_size(base)
    rows = []
    for name, cmd, env in contenders(base, adapter, work):
        model = f"{label} ({size / 1e9:.2f} GB, {shards} shards)"
        rows.append(measured_row(name, cmd, env, model=model, contender=name))
        shutil.rmtree(work / f"merged-{name.split(': ')[1]}", ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=["streaming", "peft"])
    ap.add_argument("--base")
    ap.add_argument("--adapter")
    ap.add_argument("--out")
    ap.add_argument("--no-double", action="store_true", help="skip the doubled model (memory growth check)")
    args = ap.parse_args()
    if args.child:
        child(args.child, Path(args.base), Path(args.adapter), Path(args.out))
        return
    work = Path(tempfile.mkdtemp(prefix="loraship-merge-bench-"))
    result: dict[str, Any] = {
        "machine": machine(),
        "note": "2 CPU cores shared with other engineers' work while measured",
    }
    try:
        rows = run_model("0.77B bf16", MODEL["layers"], work)
        if not args.no_double:
            rows += run_model("1.5B bf16 doubled", 2 * MODEL["layers"], work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by = {(r["model"].split(" (")[0], r["contender"]): r for r in rows}
    s, p = by[("0.77B bf16", "merge: streaming")], by[("0.77B bf16", "merge: peft")]
    ratios = {
        "wall_streaming_over_peft": round(s["wall_s"] / p["wall_s"], 3),
        "peak_rss_streaming_over_peft": round(s["peak_rss_mb"] / p["peak_rss_mb"], 3),
        "peak_anon_streaming_over_peft": round(s["peak_anon_mb"] / p["peak_anon_mb"], 3),
    }
    if ("1.5B bf16 doubled", "merge: streaming") in by:
        d = by[("1.5B bf16 doubled", "merge: streaming")]
        ratios["streaming_peak_rss_growth_when_doubled"] = round(d["peak_rss_mb"] / s["peak_rss_mb"] - 1, 3)
        ratios["streaming_peak_anon_growth_when_doubled"] = round(d["peak_anon_mb"] / s["peak_anon_mb"] - 1, 3)
        dp = by[("1.5B bf16 doubled", "merge: peft")]
        ratios["wall_streaming_over_peft_doubled"] = round(d["wall_s"] / dp["wall_s"], 3)
    report("merge", result, rows, ratios)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
