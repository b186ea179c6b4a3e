"""Issue 21: merge + convert four ways, side by side, on the >=0.8 GB benchmark model and one twice its size.

    python -m benchmarks.fused_bench              # 0.83 GB model, then the doubled 1.66 GB one
    python -m benchmarks.fused_bench --no-double  # the 0.83 GB model only
    python -m benchmarks.fused_bench --no-double --only fused shared   # some contenders only

Contenders (each in its own child process: wall time, peak RSS and peak anonymous memory of the process
tree, from benchmarks/harness.measure), all writing an F16 GGUF from the same bf16 base + r=16 adapter:
- `streaming + convert`: the streaming merge writes merged/, llama.cpp's converter reads it back;
- `fused`: merge.fused_convert, the converter reads the base through the fused tensor source (no merged/);
- `fused + merged/`: merge.fused_convert when a later stage needs merged/ (the shared read): one converter run
  writes the GGUF and merged/'s shards from one read of the base;
- `peft + upstream`: peft `merge_and_unload` + `save_pretrained`, then llama.cpp's `convert_hf_to_gguf.py`.
The converter is the same (the runtime's llama.cpp commit) in all of them and runs as the convert stage runs
it; what the convert stage does after converting (validation, tokenizer check, generation, sha256) is left
out of all, and the merge's verification is off, so the numbers are the merge and the conversion.
Two walls: `wall_s`, the child process from its start (every contender's child first imports the same harness
modules, this project's merge stage among them: ~0.5 s alike for all; stage modules make their Prefect task on
first use, so Prefect is not imported), and `stage_wall_s`, from the call into the contender's work to the GGUF
on disk (what a merge + convert adds to a flow run, whose process has the pipeline loaded; the peft contender's
torch, transformers and peft imports are inside it). Every contender starts with the inputs in the page cache.
Results: a table on stdout and benchmarks/results/fused.json (`--out NAME`: benchmarks/results/NAME.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    LORA_TARGETS,
    MEASURED,
    bench_model,
    machine,
    measured_row,
    python,
    report,
    warm_inputs,
    weights_size,
)

MODEL = dict(
    arch="llama", hidden=1280, layers=24, heads=10, kv_heads=2, intermediate=3456, dtype="bfloat16", shard_size="400MB"
)
TARGETS = LORA_TARGETS
CONTENDERS = ("streaming", "fused", "shared", "peft")
LABELS = {
    "streaming": "streaming merge + convert",
    "fused": "fused (merge.fused_convert)",
    "shared": "fused + merged/ (shared read)",
    "peft": "peft + upstream",
}


def bench_inputs(layers: int) -> tuple[Path, Path]:
    return bench_model(MODEL, layers)


def _convert(folder: Path, out: Path, fused: Path | None = None) -> None:
    """The converter as the convert stage runs it (tasks/gguf/convert_entry.py), on `folder`."""
    from tasks.gguf.convert import entry_command
    from tasks.gguf.toolchain import resolve_converter

    conv = resolve_converter()
    cmd = entry_command(conv)
    if fused is not None:
        cmd += ["--fused", str(fused), "--fused-report", str(out.with_suffix(".fused.json"))]
    cmd += ["--", str(folder), "--outfile", str(out), "--outtype", "f16"]
    subprocess.run(cmd, check=True, env=conv.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _upstream(folder: Path, out: Path) -> None:
    """llama.cpp's convert_hf_to_gguf.py run directly (what a user without this project runs)."""
    from tasks.gguf.toolchain import resolve_converter

    conv = resolve_converter()
    cmd = [sys.executable, str(conv.root / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out)]
    subprocess.run(cmd + ["--outtype", "f16"], check=True, env=conv.env(), stdout=subprocess.DEVNULL)


def child(kind: str, base: Path, adapter: Path, work: Path) -> None:
    import time

    from tasks.core.artifacts import Artifact
    from tasks.merge.stage import MergeSettings, merge

    started = time.monotonic()
    gguf = work / "model-F16.gguf"
    if kind == "peft":
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16), adapter
        )
        model.merge_and_unload().save_pretrained(str(work / "merged"))
        AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(work / "merged"))
        del model
        merged_s = time.monotonic() - started
        _upstream(work / "merged", gguf)
    elif kind == "shared":  # the merge stage's one converter run writes merged/ and the GGUF
        from tasks.gguf.convert import ConvertSettings
        from tasks.merge.fused import SharedRead

        art = Artifact.from_path(adapter, name="adapter", kind="adapter", stage="download")
        settings = MergeSettings(base_model=str(base), verify="never", fused_convert=True)
        shared = SharedRead.of(ConvertSettings(outtype="f16"), "model", work)
        merge(art, settings, work / "merged", shared=shared)
        merged_s = time.monotonic() - started
    else:
        art = Artifact.from_path(adapter, name="adapter", kind="adapter", stage="download")
        settings = MergeSettings(base_model=str(base), verify="never", fused_convert=kind == "fused")
        merged = merge(art, settings, work / "merged", fused=kind == "fused")
        merged_s = time.monotonic() - started
        if kind == "fused":
            from tasks.merge.fused import converter_folder

            with converter_folder(Path(merged.path)) as view:
                _convert(view, gguf, fused=Path(merged.path))
        else:
            _convert(Path(merged.path), gguf)
    print(json.dumps({"merge_s": round(merged_s, 2), "total_s": round(time.monotonic() - started, 2)}))


def run_model(label: str, layers: int, work: Path, kinds: tuple[str, ...] = CONTENDERS) -> list[dict[str, Any]]:
    base, adapter = bench_inputs(layers)
    size, _ = weights_size(base)
    rows = []
    for kind in kinds:
        folder = work / kind
        folder.mkdir(parents=True, exist_ok=True)
        warm_inputs(base, adapter)
        cmd = [python(), "-m", "benchmarks.fused_bench", "--child", kind, "--base", str(base)]
        cmd += ["--adapter", str(adapter)]
        env = {"TOKENIZERS_PARALLELISM": "false"}
        model = f"{label} ({size / 1e9:.2f} GB)"
        labels = {"model": model, "contender": LABELS[kind]}
        rows.append(measured_row(kind, cmd + ["--work", str(folder)], env, _stage_wall, **labels))
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def _stage_wall(out: str) -> dict[str, Any]:
    """The child's own measure of its work (the JSON line `child` prints last)."""
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return {"stage_wall_s": json.loads(line).get("total_s")}
    return {"stage_wall_s": None}


def ratios_of(rows: list[dict[str, Any]]) -> dict[str, float]:
    by = {(r["model"].split(" (")[0], r["contender"]): r for r in rows}
    ratios: dict[str, float] = {}
    for label in ("0.48B bf16", "0.9B bf16 doubled"):
        if (label, LABELS["peft"]) not in by:
            continue
        ref = by[(label, LABELS["peft"])]
        suffix = "" if label == "0.48B bf16" else "_doubled"
        for kind in ("streaming", "fused", "shared"):
            r = by.get((label, LABELS[kind]))
            if r is None:
                continue
            ratios[f"wall_{kind}_over_peft_upstream{suffix}"] = round(r["wall_s"] / ref["wall_s"], 3)
            if r.get("stage_wall_s") and ref.get("stage_wall_s"):
                stage = r["stage_wall_s"] / ref["stage_wall_s"]
                ratios[f"stage_wall_{kind}_over_peft_upstream{suffix}"] = round(stage, 3)
            ratios[f"cpu_{kind}_over_peft_upstream{suffix}"] = round(r["cpu_s"] / ref["cpu_s"], 3)
            ratios[f"peak_rss_{kind}_over_peft_upstream{suffix}"] = round(r["peak_rss_mb"] / ref["peak_rss_mb"], 3)
    for kind in ("fused", "shared"):
        if ("0.9B bf16 doubled", LABELS[kind]) in by and ("0.48B bf16", LABELS[kind]) in by:
            one, two = by[("0.48B bf16", LABELS[kind])], by[("0.9B bf16 doubled", LABELS[kind])]
            ratios[f"{kind}_peak_rss_growth_when_doubled"] = round(two["peak_rss_mb"] / one["peak_rss_mb"] - 1, 3)
            ratios[f"{kind}_peak_anon_growth_when_doubled"] = round(two["peak_anon_mb"] / one["peak_anon_mb"] - 1, 3)
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=CONTENDERS)
    ap.add_argument("--base")
    ap.add_argument("--adapter")
    ap.add_argument("--work")
    ap.add_argument("--no-double", action="store_true", help="skip the doubled model (memory growth check)")
    ap.add_argument("--only", nargs="+", choices=CONTENDERS, help="run only these contenders")
    ap.add_argument("--out", default="fused", help="results file name under benchmarks/results/ (no .json)")
    args = ap.parse_args()
    if args.child:
        child(args.child, Path(args.base), Path(args.adapter), Path(args.work))
        return
    kinds = tuple(k for k in CONTENDERS if not args.only or k in args.only)
    work = Path(tempfile.mkdtemp(prefix="loraship-fused-bench-"))
    result: dict[str, Any] = {"machine": machine(), "note": "2 CPU cores shared with other engineers' work"}
    try:
        rows = run_model("0.48B bf16", MODEL["layers"], work, kinds)
        if not args.no_double:
            rows += run_model("0.9B bf16 doubled", 2 * MODEL["layers"], work, kinds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    report(args.out, result, rows, ratios_of(rows), cols=[*MEASURED, "stage_wall_s"])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
