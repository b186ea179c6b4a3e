"""Issue 9: the whole pipeline and each stage, side by side with what users would otherwise run.

    python -m benchmarks.pipeline_bench            # everything (about 15-25 minutes on 2 cores)
    python -m benchmarks.pipeline_bench --quick    # demo + cached re-run only

Every contender runs in its own child process (benchmarks/harness.measure: wall, CPU seconds, peak
RSS and peak anonymous memory of the process tree). The model is a ~0.5B-parameter random bf16
Llama-style model with an r=16 adapter on all linear layers, built here from a config and cached.
Results: a table on stdout and benchmarks/results/pipeline.json. Ratios matter, not absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from benchmarks.harness import machine, measure, python, save, table

BENCH_MODEL = dict(
    arch="llama", hidden=1280, layers=24, heads=10, kv_heads=2, intermediate=3456, dtype="bfloat16", shard_size="400MB"
)


def bench_inputs() -> tuple[Path, Path]:
    from tasks.support.tiny_models import tiny_adapter, tiny_model

    base = tiny_model(**BENCH_MODEL)
    adapter = tiny_adapter(
        base, r=16, alpha=32, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    return base, adapter


def bench_config(base: Path, adapter: Path, runs_dir: Path, stages: list[str]) -> Path:
    cfg = {
        "model": {"name": "bench05b", "version": "v1", "base_model": str(base)},
        "source": {"kind": "local", "path": str(adapter)},
        "merge": {"base_model": str(base)},
        "pipeline": {"runs_dir": str(runs_dir), "stages": stages},
        "deployment": {"lmstudio_home": str(runs_dir / "lmstudio-home")},
    }
    path = runs_dir / "bench_config.yaml"
    runs_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_flow(config: Path, cwd: Path) -> dict[str, Any]:
    return measure([python(), "-m", "flows.full", "--config", str(config), "--json"], cwd=cwd)


def quantize_contenders(f16: Path, work: Path) -> list[tuple[str, list[str], dict[str, str]]]:
    """Three types one after another (all threads each, like running llama-quantize three times) vs ours."""
    out = []
    for name in ("sequential", "loraship"):
        d = work / f"quant-{name}"
        d.mkdir(parents=True, exist_ok=True)
        cmd = [
            python(),
            "-m",
            "benchmarks.quantize_bench",
            "--child",
            name,
            "--src",
            str(f16),
            "--out",
            str(d),
            "--types",
            "Q4_K_M",
            "Q5_K_M",
            "Q8_0",
        ]
        out.append(
            (
                f"quantize x3: {'one after another' if name == 'sequential' else 'loraship plan (parallel)'}",
                cmd,
                {"LLAMA_LOG_DISABLE": "1"},
            )
        )
    return out


def stage_contenders(base: Path, adapter: Path, work: Path) -> list[dict[str, Any]]:
    """Per-stage contenders; each stage's benchmark module provides `contenders(base, adapter, work)`."""
    rows: list[dict[str, Any]] = []
    for module in ("benchmarks.merge_bench", "benchmarks.convert_bench"):
        try:
            mod = __import__(module, fromlist=["contenders"])
        except ImportError:
            rows.append({"bench": module, "contender": "(module missing)"})
            continue
        fn = getattr(mod, "contenders", None)
        if fn is None:
            rows.append({"bench": module, "contender": "(no contenders())"})
            continue
        for name, cmd, env in fn(base, adapter, work):
            r = measure(cmd, env=env)
            rows.append({"bench": module.split(".")[-1], "contender": name, **_pick(r)})
    f16 = work / "direct-F16.gguf"  # written by the direct-converter contender
    if f16.exists():
        for name, cmd, env in quantize_contenders(f16, work):
            rows.append({"bench": "quantize", "contender": name, **_pick(measure(cmd, env=env))})
    for d in work.glob("merged-*"):
        shutil.rmtree(d, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the demo first run and the cached re-run")
    ap.add_argument(
        "--stages",
        default="download,merge,convert,quantize,hub_push,card,local_deploy",
        help="stages of the whole-flow run",
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loraship-bench-"))
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"machine": machine()}

    # The demo, first run after installation: a fresh user cache and a fresh runs folder.
    demo_cwd = work / "demo"
    demo_cwd.mkdir()
    demo = measure([python(), "-m", "flows.full"], env={"LORASHIP_CACHE": str(work / "fresh-cache")}, cwd=demo_cwd)
    rows.append({"bench": "demo", "contender": "python -m flows.full (first run, empty cache)", **_pick(demo)})
    demo2 = measure([python(), "-m", "flows.full"], env={"LORASHIP_CACHE": str(work / "fresh-cache")}, cwd=demo_cwd)
    bare = measure([python(), "-m", "benchmarks.bare_flow"])
    rows.append({"bench": "cached re-run", "contender": "python -m flows.full (demo, second run)", **_pick(demo2)})
    rows.append({"bench": "cached re-run", "contender": "bare three-task Prefect flow", **_pick(bare)})
    result["demo_first_run_s"] = demo["wall_s"]
    result["demo_cached_rerun_minus_bare_s"] = round(demo2["wall_s"] - bare["wall_s"], 2)

    if not args.quick:
        base, adapter = bench_inputs()
        rows += stage_contenders(base, adapter, work)
        cfg = bench_config(base, adapter, work / "runs", args.stages.split(","))
        first = run_flow(cfg, work)
        second = run_flow(cfg, work)
        rows.append({"bench": "whole flow 0.5B", "contender": f"flows.full ({args.stages})", **_pick(first)})
        rows.append({"bench": "whole flow 0.5B", "contender": "flows.full, cached re-run", **_pick(second)})
        result["flow_cached_rerun_minus_bare_s"] = round(second["wall_s"] - bare["wall_s"], 2)

    result["rows"] = rows
    out = save("pipeline", result)
    print(table(rows, ["bench", "contender", "wall_s", "cpu_s", "peak_rss_mb", "peak_anon_mb", "returncode"]))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    print(f"written: {out}")
    shutil.rmtree(work, ignore_errors=True)


def _pick(r: dict[str, Any]) -> dict[str, Any]:
    if r["returncode"]:
        print(f"!! {r['cmd']} failed:\n{r['tail']}")
    return {k: r[k] for k in ("wall_s", "cpu_s", "peak_rss_mb", "peak_anon_mb", "returncode")}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
