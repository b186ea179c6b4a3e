"""Convert and parallel-quantize benchmark on a ~0.4B-parameter random Llama (F16 GGUF about 0.75 GB).

    python -m benchmarks.quantize_bench [--types Q4_K_M Q5_K_M Q8_0] [--repeat 3] [--cores N]

Contenders, each in its own child process, all calling the same llama.cpp `llama_model_quantize` of
the pinned runtime:
- `sequential`: the types one after another, each with all threads (what `llama-quantize` run three
  times does);
- `all_at_once`: every type at once in threads, each with llama.cpp's default thread count and buffers;
- `loraship`: the plan of tasks/gguf/plan.py (jobs at once, costliest first, threads in proportion
  to each type's CPU work, slab buffer cap).
Wall and CPU seconds are taken inside the child around the quantize calls only (the interpreter start
and imports are the same for every contender and are not quantize work); peak RSS and peak anonymous
memory are of the whole child (benchmarks/harness.py). Every contender does the same work, so the floor
(the types' CPU work / cores) is the median CPU seconds of all runs / cores (this machine's CPU seconds
for the same work scatter by +-8% between runs); rounds run the contenders back to back in alternating
order, and the table reports the median per contender (see `summarize`). `--cores N` pins the children
to N cores (sched_setaffinity), so that a smaller machine can be measured here. Convert is timed once
(llama.cpp's converter through tasks/gguf/convert.py). Results: benchmarks/results/quantize_bench-<N>cores.json.
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


def build_model(out: Path, hidden: int = 1024, layers: int = 24, intermediate: int = 2816, vocab: int = 32000) -> Path:
    """A Llama with random F16 weights, cached; by default hidden 1024, 24 layers, vocab 32000 (0.37B params)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tasks.support.tiny_models import tiny_model

    if (out / ".complete").exists():
        return out
    tok_src = tiny_model("llama", hidden=256)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
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

    from tasks.gguf.quantize import ftype_names

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype_names()[quant]
    p.nthread = nthread
    p.max_buf_size = max_buf
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(f"quantize {quant} failed: {rc}")


def child(contender: str, src: str, out_dir: str, types: list[str], cores: int) -> None:
    """Runs inside the child process: one contender's schedule; prints the inner wall and CPU seconds."""
    import logging
    import resource
    from concurrent.futures import ThreadPoolExecutor

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    import llama_cpp._logger  # noqa: F401  (installs the callback that honours that level)

    from tasks.gguf.quantize import ftype_names

    ftype_names()
    if cores < len(os.sched_getaffinity(0)):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    outputs = {q: os.path.join(out_dir, f"bench-{q}.gguf") for q in types}
    extra: dict = {}
    if contender == "loraship":
        from tasks.gguf.plan import plan_jobs

        plan = plan_jobs(Path(src), types, cores=cores)
        k, max_buf, order = plan.parallel, plan.max_buf_size, plan.start_order(types)
        threads = {q: plan.threads_for(q) for q in types}
        extra = {"parallel": k, "threads": threads, "max_buf_size": max_buf, "order": order}
    elif contender == "all_at_once":
        k, max_buf, order, threads = len(types), 0, types, {q: 0 for q in types}  # 0: llama.cpp's default threads
    else:
        k, max_buf, order, threads = 1, 0, types, {q: cores for q in types}

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    t0, c0 = time.monotonic(), cpu()
    ends: dict[str, float] = {}

    def run(q: str) -> None:
        _quantize_raw(src, outputs[q], q, threads[q], max_buf)
        ends[q] = round(time.monotonic() - t0, 2)

    with ThreadPoolExecutor(max_workers=k) as pool:  # FIFO: jobs start in `order`
        for f in [pool.submit(run, q) for q in order]:
            f.result()
    wall, used = time.monotonic() - t0, cpu() - c0
    print(json.dumps(extra | {"wall_s": round(wall, 2), "cpu_s": round(used, 2), "ends_s": ends}), flush=True)


def measure(args: list[str]) -> dict:
    """One contender in a fresh child process: its inner timing, and the tree's peak VmRSS/RssAnon."""
    from benchmarks.harness import measure as run_measured

    r = run_measured([sys.executable, "-m", "benchmarks.quantize_bench", *args], env={"LLAMA_LOG_DISABLE": "1"})
    if r["returncode"] != 0:
        raise SystemExit(f"child {args} failed: {r['tail']}")
    inner: dict = {}
    for line in r["tail"].splitlines():
        if line.startswith("{") and line.endswith("}"):
            inner.update(json.loads(line))
    return {"process_wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"], "peak_anon_mb": r["peak_anon_mb"]} | inner


def _median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "Q5_K_M", "Q8_0"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cores", type=int, default=None)
    ap.add_argument(
        "--work", default=None, help="folder for the model and the files (default: ~/.cache/loraship/bench)"
    )
    ap.add_argument("--skip-convert", action="store_true")
    ap.add_argument(
        "--contenders",
        nargs="+",
        default=["sequential", "all_at_once", "loraship"],
        choices=["sequential", "all_at_once", "loraship"],
    )
    ap.add_argument(
        "--summarize",
        action="store_true",
        help=(
            "recompute the ratios of the stored results (benchmarks/results/quantize_bench-<N>cores.json) "
            "without running anything"
        ),
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--src", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    from tasks.gguf.plan import usable_cores

    cores = a.cores or usable_cores()
    if a.child == "convert":
        from tasks.core.artifacts import Artifact
        from tasks.gguf.convert import ConvertSettings, convert

        t = time.monotonic()
        art = convert(
            Artifact.from_path(a.src, name="merged", kind="merged", stage="merge"),
            ConvertSettings(check_tokenizer=False),
            Path(a.out),
            "bench",
        )
        print(
            json.dumps(
                {
                    "converter_s": art.meta["seconds"],
                    "convert_stage_s": round(time.monotonic() - t, 2),
                    "f16_bytes": art.size,
                }
            ),
            flush=True,
        )
        return
    if a.child:
        child(a.child, a.src, a.out, a.types, cores)
        return
    if a.summarize:
        path = RESULTS / f"quantize_bench-{cores}cores.json"
        stored = json.loads(path.read_text())
        stored.update(summarize(stored["runs"], cores))
        path.write_text(json.dumps(stored, indent=2) + "\n")
        print(json.dumps(stored["median"], indent=2))
        return

    from tasks.support.tiny_models import cache_root

    work = Path(a.work) if a.work else cache_root() / "bench"
    model = build_model(work / "llama-0.4b")
    gguf_dir = work / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    f16 = gguf_dir / "bench-F16.gguf"
    from benchmarks.harness import machine

    result: dict = {"machine": machine() | {"cores_used": cores}, "types": a.types}
    if not a.skip_convert or not f16.exists():
        result["convert"] = measure(["--child", "convert", "--src", str(model), "--out", str(gguf_dir)])
        result["convert"]["mb_per_s"] = round(
            result["convert"]["f16_bytes"] / 1e6 / result["convert"]["converter_s"], 1
        )
        print("convert:", result["convert"], flush=True)
    else:  # keep the convert numbers of the last full run
        previous = RESULTS / f"quantize_bench-{cores}cores.json"
        if previous.exists():
            result["convert"] = json.loads(previous.read_text()).get("convert")
    rounds: list[dict[str, dict]] = []
    for i in range(a.repeat):
        contenders = a.contenders if i % 2 == 0 else list(reversed(a.contenders))  # no contender always runs first
        rnd: dict[str, dict] = {}
        for contender in contenders:
            r = measure(
                [
                    "--child",
                    contender,
                    "--src",
                    str(f16),
                    "--out",
                    str(gguf_dir),
                    "--types",
                    *a.types,
                    "--cores",
                    str(cores),
                ]
            )
            rnd[contender] = r
            print(contender, r, flush=True)
        rounds.append(rnd)
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    result.update(summarize(rounds, cores))
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"quantize_bench-{cores}cores.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median"], indent=2))
    print(
        f"median of {len(rounds)} rounds; floor = median CPU s of all runs / {cores} cores = "
        f"{result['floor_s']} s; results in benchmarks/results/{name}"
    )


def summarize(rounds: list[dict[str, dict]], cores: int) -> dict:
    """Ratios per run and the median per contender.

    Every contender does the same work (the same three files), so every run's CPU seconds measure that
    work; on this machine they scatter by +-8% from run to run. The floor ("the types' CPU work / cores")
    is therefore the median CPU seconds of all runs / cores. Also kept: the round floor (least CPU of the
    round's contenders / cores: biased low, since it takes the luckiest of noisy values) and each run's
    wall against its own CPU seconds / cores (1.0: every core busy with this work the whole time).
    """
    floor = _median([r["cpu_s"] for rnd in rounds for r in rnd.values()]) / cores
    for rnd in rounds:
        round_floor = min(r["cpu_s"] for r in rnd.values()) / cores
        seq = rnd.get("sequential") or next(iter(rnd.values()))
        for r in rnd.values():
            r["round_floor_s"] = round(round_floor, 2)
            r["wall_vs_floor"] = round(r["wall_s"] / floor, 3)
            r["wall_vs_round_floor"] = round(r["wall_s"] / round_floor, 3)
            r["wall_vs_own_cpu"] = round(r["wall_s"] * cores / r["cpu_s"], 3)
            r["wall_vs_sequential"] = round(r["wall_s"] / seq["wall_s"], 3)
            r["rss_vs_sequential"] = round(r["peak_rss_mb"] / seq["peak_rss_mb"], 3)
            r["anon_vs_sequential"] = round(r["peak_anon_mb"] / seq["peak_anon_mb"], 3)
            r.pop("floor_s", None)
    keys = (
        "wall_s",
        "cpu_s",
        "peak_rss_mb",
        "peak_anon_mb",
        "wall_vs_floor",
        "wall_vs_round_floor",
        "wall_vs_own_cpu",
        "wall_vs_sequential",
        "rss_vs_sequential",
        "anon_vs_sequential",
    )
    contenders = list(rounds[0])
    median = {c: {k: round(_median([rnd[c][k] for rnd in rounds if c in rnd]), 3) for k in keys} for c in contenders}
    for c in median:
        for k in ("parallel", "threads", "max_buf_size", "order"):
            if k in rounds[0][c]:
                median[c][k] = rounds[0][c][k]
    return {"floor_s": round(floor, 2), "rounds": len(rounds), "median": median, "runs": rounds}


if __name__ == "__main__":
    main()
