"""Issue 21: merge + convert three ways, side by side, on the >=0.8 GB benchmark model and one twice its size.

    python -m benchmarks.fused_bench              # 0.83 GB model, then the doubled 1.66 GB one
    python -m benchmarks.fused_bench --no-double  # the 0.83 GB model only

Contenders (each in its own child process: wall time, peak RSS and peak anonymous memory of the process
tree, from benchmarks/harness.measure), all writing an F16 GGUF from the same bf16 base + r=16 adapter:
- `streaming + convert`: the streaming merge writes merged/, llama.cpp's converter reads it back;
- `fused`: merge.fused_convert, the converter reads the base through the fused tensor source (no merged/);
- `peft + upstream`: peft `merge_and_unload` + `save_pretrained`, then llama.cpp's `convert_hf_to_gguf.py`.
The converter is the same (the runtime's llama.cpp commit) in all three and runs as the convert stage runs
it; what the convert stage does after converting (validation, tokenizer check, generation, sha256) is left
out of all three, and the merge's verification is off, so the numbers are the merge and the conversion.
Results: a table on stdout and benchmarks/results/fused.json.
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

from benchmarks.harness import machine, measure, python, save, table

MODEL = dict(
    arch="llama", hidden=1280, layers=24, heads=10, kv_heads=2, intermediate=3456, dtype="bfloat16", shard_size="400MB"
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONTENDERS = ("streaming", "fused", "peft")
LABELS = {"streaming": "streaming merge + convert", "fused": "fused (merge.fused_convert)", "peft": "peft + upstream"}


def bench_inputs(layers: int) -> tuple[Path, Path]:
    from tasks.support.tiny_models import tiny_adapter, tiny_model

    base = tiny_model(**{**MODEL, "layers": layers})
    return base, tiny_adapter(base, r=16, alpha=32, targets=TARGETS)


def _convert(folder: Path, out: Path, fused: Path | None = None) -> None:
    """The converter as the convert stage runs it (tasks/gguf/convert_entry.py), on `folder`."""
    from tasks.gguf.convert import ENTRY
    from tasks.gguf.toolchain import resolve_converter

    conv = resolve_converter()
    cmd = [sys.executable, str(ENTRY), "--llama-cpp", str(conv.root)]
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


def run_model(label: str, layers: int, work: Path) -> list[dict[str, Any]]:
    base, adapter = bench_inputs(layers)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    rows = []
    for kind in CONTENDERS:
        folder = work / kind
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [
            python(),
            "-m",
            "benchmarks.fused_bench",
            "--child",
            kind,
            "--base",
            str(base),
            "--adapter",
            str(adapter),
        ]
        r = measure(cmd + ["--work", str(folder)], env={"TOKENIZERS_PARALLELISM": "false"})
        if r["returncode"]:
            print(f"!! {kind} failed:\n{r['tail']}", file=sys.stderr)
        rows.append(
            {
                "model": f"{label} ({size / 1e9:.2f} GB)",
                "contender": LABELS[kind],
                **{k: r[k] for k in ("wall_s", "cpu_s", "peak_rss_mb", "peak_anon_mb", "returncode")},
            }
        )
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=CONTENDERS)
    ap.add_argument("--base")
    ap.add_argument("--adapter")
    ap.add_argument("--work")
    ap.add_argument("--no-double", action="store_true", help="skip the doubled model (memory growth check)")
    args = ap.parse_args()
    if args.child:
        child(args.child, Path(args.base), Path(args.adapter), Path(args.work))
        return
    work = Path(tempfile.mkdtemp(prefix="loraship-fused-bench-"))
    result: dict[str, Any] = {"machine": machine(), "note": "2 CPU cores shared with other engineers' work"}
    try:
        rows = run_model("0.48B bf16", MODEL["layers"], work)
        if not args.no_double:
            rows += run_model("0.9B bf16 doubled", 2 * MODEL["layers"], work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by = {(r["model"].split(" (")[0], r["contender"]): r for r in rows}
    ratios: dict[str, float] = {}
    for label in ("0.48B bf16", "0.9B bf16 doubled"):
        if (label, LABELS["peft"]) not in by:
            continue
        ref = by[(label, LABELS["peft"])]
        suffix = "" if label == "0.48B bf16" else "_doubled"
        for kind in ("streaming", "fused"):
            r = by[(label, LABELS[kind])]
            ratios[f"wall_{kind}_over_peft_upstream{suffix}"] = round(r["wall_s"] / ref["wall_s"], 3)
            ratios[f"peak_rss_{kind}_over_peft_upstream{suffix}"] = round(r["peak_rss_mb"] / ref["peak_rss_mb"], 3)
    if ("0.9B bf16 doubled", LABELS["fused"]) in by:
        one, two = by[("0.48B bf16", LABELS["fused"])], by[("0.9B bf16 doubled", LABELS["fused"])]
        ratios["fused_peak_rss_growth_when_doubled"] = round(two["peak_rss_mb"] / one["peak_rss_mb"] - 1, 3)
        ratios["fused_peak_anon_growth_when_doubled"] = round(two["peak_anon_mb"] / one["peak_anon_mb"] - 1, 3)
    result["rows"], result["ratios"] = rows, ratios
    out = save("fused", result)
    print(table(rows, ["model", "contender", "wall_s", "cpu_s", "peak_rss_mb", "peak_anon_mb", "returncode"]))
    print(json.dumps(ratios, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
