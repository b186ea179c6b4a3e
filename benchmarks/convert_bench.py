"""Convert: our stage against llama.cpp's converter run by hand, to show our overhead.

    python -m benchmarks.convert_bench                       # the ~0.5B benchmark model of pipeline_bench
    python -m benchmarks.convert_bench --model DIR           # any HF folder

Both contenders run the same convert_hf_to_gguf.py (the one matching the installed llama.cpp runtime)
to f16, each in a child process. Ours adds what the stage always does: the disk preflight, an atomic
write, GGUF validation with GGUFReader, the tokenizer parity check, a few generated tokens and the
output's sha256. The merged folder is the base model itself: same shapes, same converter work.

Ours is timed twice: the child process as a whole, and the stage call inside it (`stage_s`: what a
flow run pays, its interpreter and Prefect import being paid once per run; reported apart as
`startup_s`), as benchmarks/download_bench.py does. `--repeat N` interleaves the contenders N times
and keeps the medians.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import machine, measure, python, save, table, warm_inputs


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
    started = time.perf_counter()
    art = convert(merged, ConvertSettings(), out, "bench")
    stage_s = time.perf_counter() - started
    print(
        json.dumps(
            {
                "stage_s": round(stage_s, 3),
                "converter_s": art.meta["seconds"],
                "size": art.size,
                "hashed_while_writing": art.meta.get("hashed_while_writing"),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--repeat", type=int, default=1, help="interleaved runs of each contender (medians kept)")
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
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeat):
        for name, cmd, env in contenders(model, model, work):  # interleaved: a busy moment hits both
            for p in work.rglob("*.gguf"):
                p.unlink()
            warm_inputs(Path(model))
            r = measure(cmd, env=env)
            if r["returncode"]:
                print(f"!! {name} failed:\n{r['tail']}", file=sys.stderr)
            row = {k: r[k] for k in ("wall_s", "cpu_s", "peak_rss_mb", "peak_anon_mb", "returncode")}
            got = _last_json(r["tail"])
            if "stage_s" in got:
                row |= {"stage_s": got["stage_s"], "startup_s": round(r["wall_s"] - got["stage_s"], 3)}
                row["hashed_while_writing"] = got.get("hashed_while_writing")
            runs.setdefault(name, []).append(row)
    rows: list[dict[str, Any]] = []
    for name, rs in runs.items():
        row = {"contender": name, "repeat": len(rs)}
        for k in ("wall_s", "stage_s", "startup_s", "cpu_s", "peak_rss_mb", "peak_anon_mb"):
            if all(k in r for r in rs):
                row[k] = round(statistics.median(r[k] for r in rs), 3)
        row["wall_runs_s"] = [r["wall_s"] for r in rs]
        row["returncode"] = max(r["returncode"] for r in rs)
        if "hashed_while_writing" in rs[0]:
            row["hashed_while_writing"] = all(r["hashed_while_writing"] for r in rs)
        rows.append(row)
    size_gb = sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) / 1e9
    direct = rows[1]["wall_s"]
    ratio = round(rows[0]["wall_s"] / direct, 3) if direct else None
    stage_ratio = round(rows[0]["stage_s"] / direct, 3) if direct and "stage_s" in rows[0] else None
    out = save(
        "convert",
        {
            "machine": machine(),
            "command": " ".join(["python -m benchmarks.convert_bench", *sys.argv[1:]]),
            "model": str(model),
            "model_gb": round(size_gb, 3),
            "rows": rows,
            "ours_over_direct": ratio,
            "stage_over_direct": stage_ratio,
        },
    )
    print(table(rows, ["contender", "wall_s", "stage_s", "startup_s", "cpu_s", "peak_rss_mb", "returncode"]))
    print(f"model {size_gb:.2f} GB; ours / direct wall = {ratio}; the stage call / direct = {stage_ratio}")
    print(f"written {out}")
    shutil.rmtree(work, ignore_errors=True)


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return {}
    return {}


if __name__ == "__main__":
    main()
