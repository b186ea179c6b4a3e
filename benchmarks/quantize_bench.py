"""Convert and parallel-quantize benchmark on a ~0.4B-parameter random Llama (F16 GGUF about 0.75 GB).

    python -m benchmarks.quantize_bench [--types Q4_K_M Q5_K_M Q8_0] [--repeat 1] [--cores N]

Contenders, each in its own child process (wall seconds, CPU seconds and peak RSS of that process, from
os.wait4), all calling the same llama.cpp `llama_model_quantize` of the pinned runtime:
- `sequential`: the types one after another, each with all threads (what `llama-quantize` run three
  times does);
- `all_at_once`: every type at once in threads, each with llama.cpp's default thread count and buffers;
- `loraship`: the plan of tasks/quantize_plan.py (jobs at once, threads each, slab buffer cap).
The floor is the sequential contender's CPU seconds / cores. Convert is timed once (llama.cpp's
converter through tasks/convert.py). Results go to benchmarks/results/quantize_bench.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def build_model(out: Path) -> Path:
    """A Llama with hidden 1024, 24 layers, vocab 32000 (0.37B params), random F16 weights, cached."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tasks.tiny_models import tiny_model

    if (out / ".complete").exists():
        return out
    tok_src = tiny_model("llama", hidden=256)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tok_src)).save_pretrained(out)
    for name in ("tokenizer.model",):
        if (tok_src / name).exists():
            (out / name).write_bytes((tok_src / name).read_bytes())
    (out / ".complete").write_text("ok\n")
    return out


def _quantize_raw(src: str, dst: str, quant: str, nthread: int, max_buf: int) -> None:
    import llama_cpp

    from tasks.quantize import ftype_names

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype_names()[quant]
    p.nthread = nthread
    p.max_buf_size = max_buf
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(f"quantize {quant} failed: {rc}")


def child(contender: str, src: str, out_dir: str, types: list[str], cores: int) -> None:
    """Runs inside the child process: one contender's schedule."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    import llama_cpp._logger  # noqa: F401  (installs the callback that honours that level)

    jobs = [(src, os.path.join(out_dir, f"bench-{q}.gguf"), q) for q in types]
    if contender == "sequential":
        for s, d, q in jobs:
            _quantize_raw(s, d, q, cores, 0)
        return
    if contender == "all_at_once":
        k, threads, max_buf = len(jobs), 0, 0
    else:
        from tasks.quantize_plan import plan_jobs

        plan = plan_jobs(Path(src), len(jobs), cores=cores)
        k, threads, max_buf = plan.parallel, plan.threads, plan.max_buf_size
    with ThreadPoolExecutor(max_workers=k) as pool:
        for f in [pool.submit(_quantize_raw, s, d, q, threads, max_buf) for s, d, q in jobs]:
            f.result()
    if contender == "loraship":
        print(json.dumps({"parallel": k, "threads": threads, "max_buf_size": max_buf}), flush=True)


def measure(args: list[str]) -> dict:
    """One contender in a fresh child process (benchmarks/harness.py samples the tree's VmRSS/RssAnon)."""
    from benchmarks.harness import measure as run_measured

    r = run_measured([sys.executable, "-m", "benchmarks.quantize_bench", *args], env={"LLAMA_LOG_DISABLE": "1"})
    if r["returncode"] != 0:
        raise SystemExit(f"child {args} failed: {r['tail']}")
    extra = {}
    for line in r["tail"].splitlines():
        if line.startswith("{") and line.endswith("}"):
            extra.update(json.loads(line))
    return {k: r[k] for k in ("wall_s", "cpu_s", "peak_rss_mb", "peak_anon_mb")} | extra


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "Q5_K_M", "Q8_0"])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cores", type=int, default=None)
    ap.add_argument("--work", default=None, help="folder for the model and the files (default: ~/.cache/loraship/bench)")
    ap.add_argument("--skip-convert", action="store_true")
    ap.add_argument("--contenders", nargs="+", default=["sequential", "all_at_once", "loraship"], choices=["sequential", "all_at_once", "loraship"])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--src", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    from tasks.quantize_plan import usable_cores

    cores = a.cores or usable_cores()
    if a.child == "convert":
        from tasks.convert import ConvertSettings, convert
        from tasks.core.artifacts import Artifact

        t = time.monotonic()
        art = convert(Artifact.from_path(a.src, name="merged", kind="merged", stage="merge"), ConvertSettings(check_tokenizer=False), Path(a.out), "bench")
        print(json.dumps({"converter_s": art.meta["seconds"], "convert_stage_s": round(time.monotonic() - t, 2), "f16_bytes": art.size}), flush=True)
        return
    if a.child:
        child(a.child, a.src, a.out, a.types, cores)
        return

    from tasks.tiny_models import cache_root

    work = Path(a.work) if a.work else cache_root() / "bench"
    model = build_model(work / "llama-0.4b")
    gguf_dir = work / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    f16 = gguf_dir / "bench-F16.gguf"
    from benchmarks.harness import machine

    result: dict = {"machine": machine() | {"cores_used": cores, "note": "CPU shared with other engineers' work while measured" if cores <= 2 else ""}, "types": a.types}
    if not a.skip_convert or not f16.exists():
        result["convert"] = measure(["--child", "convert", "--src", str(model), "--out", str(gguf_dir)])
        result["convert"]["mb_per_s"] = round(result["convert"]["f16_bytes"] / 1e6 / result["convert"]["converter_s"], 1)
        print("convert:", result["convert"], flush=True)
    else:  # keep the convert numbers of the last full run
        previous = RESULTS / f"quantize_bench-{cores}cores.json"
        if previous.exists():
            result["convert"] = json.loads(previous.read_text()).get("convert")
    runs: dict[str, list[dict]] = {}
    for _ in range(a.repeat):
        for contender in a.contenders:
            r = measure(["--child", contender, "--src", str(f16), "--out", str(gguf_dir), "--types", *a.types, "--cores", str(cores)])
            runs.setdefault(contender, []).append(r)
            print(contender, r, flush=True)
    best = {c: min(rs, key=lambda r: r["wall_s"]) for c, rs in runs.items()}
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    floor = min(r["cpu_s"] for rs in runs.values() for r in rs) / cores  # least CPU work of any contender
    seq = best.get("sequential") or next(iter(best.values()))
    for c, r in best.items():
        r["wall_vs_floor"] = round(r["wall_s"] / floor, 3)
        r["wall_vs_sequential"] = round(r["wall_s"] / seq["wall_s"], 3)
        r["rss_vs_sequential"] = round(r["peak_rss_mb"] / seq["peak_rss_mb"], 3)
        r["anon_vs_sequential"] = round(r["peak_anon_mb"] / seq["peak_anon_mb"], 3)
    result.update({"floor_s": round(floor, 2), "best": best, "runs": runs})
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"quantize_bench-{cores}cores.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: best[k] for k in best}, indent=2))
    print(f"floor (least CPU s of a contender / {cores} cores) = {floor:.1f}s; results in benchmarks/results/{name}")


if __name__ == "__main__":
    main()
