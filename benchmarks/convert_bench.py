"""Convert: our stage against llama.cpp's converter run by hand, to show our overhead.

    python -m benchmarks.convert_bench                       # the ~0.5B benchmark model of pipeline_bench
    python -m benchmarks.convert_bench --model DIR           # any HF folder

Both contenders run the same convert_hf_to_gguf.py (the one matching the installed llama.cpp runtime)
to f16, each in a child process. Ours adds what the stage always does: the disk preflight, an atomic
write, GGUF validation with GGUFReader, the tokenizer parity check, a few generated tokens and the
output's sha256. The merged folder is the base model itself: same shapes, same converter work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import machine, measure, python, save, table


def contenders(base: Path, adapter: Path, work: Path) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, command, env) of each contender, for this script and benchmarks/pipeline_bench."""
    from tasks.gguf.toolchain import resolve_converter

    conv = resolve_converter()
    direct = [python(), str(conv.script), str(base), "--outfile", str(work / "direct-F16.gguf"), "--outtype", "f16"]
    ours = [python(), "-m", "benchmarks.convert_bench", "--child", "--model", str(base), "--out", str(work / "ours")]
    return [
        ("convert: loraship stage", ours, {}),
        ("convert: llama.cpp convert_hf_to_gguf.py directly", direct, conv.env({})),
    ]


def child(model: Path, out: Path) -> None:
    from tasks.core.artifacts import Artifact
    from tasks.gguf.convert import ConvertSettings, convert

    merged = Artifact.from_path(model, name="merged", kind="merged", stage="merge")
    art = convert(merged, ConvertSettings(), out, "bench")
    print(json.dumps({"seconds": art.meta["seconds"], "size": art.size}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.model, args.out)
        return
    model = args.model
    if model is None:
        from benchmarks.pipeline_bench import bench_inputs

        model, _ = bench_inputs()
    work = Path(tempfile.mkdtemp(prefix="loraship-convert-bench-"))
    rows: list[dict[str, Any]] = []
    for name, cmd, env in contenders(model, model, work):
        r = measure(cmd, env=env)
        if r["returncode"]:
            print(f"!! {name} failed:\n{r['tail']}", file=sys.stderr)
        rows.append(
            {"contender": name, **{k: r[k] for k in ("wall_s", "cpu_s", "peak_rss_mb", "peak_anon_mb", "returncode")}}
        )
    size_gb = sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) / 1e9
    ratio = round(rows[0]["wall_s"] / rows[1]["wall_s"], 3) if rows[1]["wall_s"] else None
    out = save(
        "convert",
        {
            "machine": machine(),
            "model": str(model),
            "model_gb": round(size_gb, 3),
            "rows": rows,
            "ours_over_direct": ratio,
        },
    )
    print(table(rows, ["contender", "wall_s", "cpu_s", "peak_rss_mb", "peak_anon_mb", "returncode"]))
    print(f"model {size_gb:.2f} GB; ours / direct wall = {ratio}; written {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
