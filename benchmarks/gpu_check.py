"""`python -m benchmarks.gpu_bench --all`: the one prepared GPU check (issue 19), step by step, one JSON.

GPU time is short (about 15 minutes a session, start-up included), so everything the GPU paths need
checking runs from this one command within a budget, each step recorded (ok / failed / skipped, seconds,
what it measured) even when an earlier one failed, and the JSON is written after every step: a run cut
short still leaves what it measured. See benchmarks/gpu_bench.py's docstring for the list of steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS, ROOT, machine, table

GOALS = {
    "pipeline_7b_s": 300,  # merge + convert + three quants of the 7B-size model (issue 19)
    "unsloth_vs_streaming_max_ulps": 1,  # bf16 units in the last place, per weight
    "quantize_wall_vs_cpu_floor": 1.1,
}


def requirements() -> dict[str, str | None]:
    """What the GPU steps need -> why it is missing here (None: present)."""
    out: dict[str, str | None] = {}
    try:
        import torch

        cuda = torch.cuda.is_available()
        out["cuda"] = (
            None
            if cuda
            else f"a CUDA GPU (torch {torch.__version__}, built for CUDA {torch.version.cuda}, sees no GPU)"
        )
    except ImportError:
        out["cuda"] = "a CUDA GPU and torch (torch is not installed)"
    out["unsloth"] = (
        None if importlib.util.find_spec("unsloth") else "the unsloth package (pip install 'loraship[gpu]')"
    )
    out["llama_gpu"] = _llama_gpu_missing()
    return out


def _llama_gpu_missing() -> str | None:
    """Asked of a fresh interpreter: the build step may replace llama-cpp-python, and a module imported here
    before it would stay the old build for the rest of this process."""
    probe = "import llama_cpp; print(llama_cpp.llama_supports_gpu_offload(), llama_cpp.__version__)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    if out.returncode:
        return "llama-cpp-python (it does not import: run setup.sh)"
    offload, version = (out.stdout.split() + ["", ""])[:2]
    if offload == "True":
        return None
    return (
        f"llama-cpp-python built with CUDA (the installed {version} is a CPU build; setup.sh builds the CUDA one "
        "where a CUDA toolkit and a GPU are found)"
    )


class Check:
    """Runs the steps in order within the budget; each one recorded, the JSON rewritten after each."""

    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args, self.out = args, out
        self.deadline = time.monotonic() + args.budget
        self.started = time.time()
        self.missing = requirements()
        self.steps: list[dict[str, Any]] = []
        self.facts: dict[str, Any] = {}

    def step(self, name: str, fn: Callable[[], dict[str, Any] | None], needs: tuple[str, ...] = ()) -> dict | None:
        row: dict[str, Any] = {"step": name, "status": "skipped", "seconds": 0.0}
        lacking = [self.missing[n] for n in needs if self.missing.get(n)]
        if lacking:
            row["reason"] = "needs " + "; ".join(str(x) for x in lacking)
        elif time.monotonic() > self.deadline:
            row["reason"] = f"out of the time budget ({self.args.budget:.0f} s)"
        else:
            t0 = time.monotonic()
            try:
                detail = fn() or {}
                row.update(status="ok", **detail)
            except Exception as exc:
                row.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:2000])
                row["traceback"] = traceback.format_exc(limit=6)[-3000:]
            row["seconds"] = round(time.monotonic() - t0, 1)
        self.steps.append(row)
        print(f"== {name}: {row['status']} in {row['seconds']} s {row.get('reason', '')}", flush=True)
        self.save()
        return row if row["status"] == "ok" else None

    def save(self) -> None:
        from benchmarks.gpu_bench import gpu_info

        payload = {
            "command": "python -m benchmarks.gpu_bench " + " ".join(sys.argv[1:]),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "machine": machine(),
            "gpu": gpu_info(),
            "cores": os.cpu_count(),
            "size": self.args.size,
            "missing": {k: v for k, v in self.missing.items() if v},
            "steps": self.steps,
            "results": self.facts,
            "goals": GOALS,
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")


# --- the steps --------------------------------------------------------------------------------------------


def build_step() -> dict[str, Any]:
    """setup.sh as a user runs it (idempotent: installs only what is missing; the CUDA wheel is cached)."""
    from dataclasses import asdict

    from tasks.support.llama_build import detect

    det = detect()
    out = subprocess.run(["bash", "setup.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(f"setup.sh exited {out.returncode}: {(out.stdout + out.stderr)[-1500:]}")
    return {"llama_build": asdict(det), "gpu_offload": _llama_gpu_missing() is None, "tail": out.stdout[-500:]}


def max_ulps(a_dir: Path, b_dir: Path, base_dir: Path | None = None) -> dict[str, Any]:
    """How far apart two merged folders are, per weight, in bf16 ulps at the weight's scale (the larger of the
    two values and the base's, as tests/test_merge.py measures streaming against peft: where an update
    cancels most of a weight, a backend that rounds the update before adding it is more than one ulp of the
    small result away, and still right at the weight's scale)."""
    from safetensors import safe_open

    from tasks.merge.tensor_check import ulp

    def tensors(folder: Path | None) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for f in sorted(folder.glob("*.safetensors")) if folder else []:
            with safe_open(str(f), "pt") as fh:
                found.update(dict.fromkeys(fh.keys(), f))
        return found

    def load(where: dict[str, Path], name: str) -> Any:
        with safe_open(str(where[name]), "pt") as fh:
            return fh.get_tensor(name).float()

    a, b, base = tensors(a_dir), tensors(b_dir), tensors(base_dir)
    if set(a) != set(b):
        raise ValueError(f"different tensors: only in one of them: {sorted(set(a) ^ set(b))[:5]}")
    worst, worst_name, over = 0.0, "", 0
    for name in sorted(a):
        x, y = load(a, name), load(b, name)
        scale = x.abs().maximum(y.abs())
        if name in base:
            scale = scale.maximum(load(base, name).abs())
        d = (x - y).abs().double() / ulp(scale, "BF16")
        m = float(d.max()) if d.numel() else 0.0
        over += int((d > 1).sum())
        if m > worst:
            worst, worst_name = m, name
        del x, y, scale, d
    return {"max_ulps": round(worst, 3), "worst_tensor": worst_name, "weights_over_1_ulp": over, "tensors": len(a)}


def unsloth_fixture_step(work: Path) -> dict[str, Any]:
    """The stage's unsloth merge of the tiny bf16 fixture (16-bit and QLoRA round trip), verified by the stage
    against peft on the same base, and compared with the streaming merge weight by weight."""
    from tasks.core.artifacts import Artifact
    from tasks.merge.stage import MergeSettings, merge
    from tasks.support.tiny_models import tiny_adapter, tiny_model

    base = tiny_model("llama", dtype="bfloat16")
    adapter = Artifact.from_path(tiny_adapter(base), name="adapter", kind="adapter", stage="download")
    out: dict[str, Any] = {}
    for label, extra in (
        ("16bit", {}),
        ("qlora_nf4_dq", {"qlora": "roundtrip", "qlora_format": {"double_quant": True}}),
    ):
        merged = {}
        for backend in ("streaming", "unsloth"):
            settings = MergeSettings(backend=backend, base_model=str(base), verify="always", **extra)
            merged[backend] = merge(adapter, settings, work / f"fixture-{label}-{backend}")
        u = merged["unsloth"].meta
        out[label] = {
            "verify_passed": u.get("verify_passed"),
            "max_abs_logit_diff": u.get("max_abs_logit_diff"),
            "unsloth_loaded": u.get("unsloth_loaded"),
            **max_ulps(Path(merged["streaming"].path), Path(merged["unsloth"].path), base),
        }
    return out


def model_api_step() -> dict[str, Any]:
    """The model API's fp16 path, once the model API exists (issue 17): its tests named fp16, on this GPU."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_model_api*.py"))
    if not (ROOT / "tasks" / "model_api").is_dir() or not files:
        return {"ran": False, "why": "tasks/model_api (issue 17) is not on this checkout yet"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "fp16", *files]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if out.returncode not in (0, 5):
        raise RuntimeError(f"model API fp16 tests failed:\n{out.stdout[-1500:]}")
    return {"ran": out.returncode == 0, "pytest": out.stdout.strip().splitlines()[-1:] or [""]}


def generation_tps(gguf: Path, gpu: bool, tokens: int) -> dict[str, Any]:
    """Tokens/s of greedy generation with llama.cpp (the serve engine's library): all layers on the GPU, or none."""
    from llama_cpp import Llama

    t0 = time.monotonic()
    llm = Llama(
        model_path=str(gguf),
        n_ctx=512,
        n_gpu_layers=-1 if gpu else 0,
        n_threads=os.cpu_count() or 1,
        seed=0,
        verbose=False,
    )
    load_s = time.monotonic() - t0
    llm.create_completion("The", max_tokens=4, temperature=0.0)  # warm-up
    t0 = time.monotonic()
    res = llm.create_completion("Once upon a time", max_tokens=tokens, temperature=0.0)
    gen_s = time.monotonic() - t0
    n = res["usage"]["completion_tokens"]
    del llm
    return {"tokens": n, "load_s": round(load_s, 2), "tokens_per_s": round(n / gen_s, 2) if gen_s else None}


def run_check(args: argparse.Namespace) -> int:
    from benchmarks.gpu_bench import build_adapter, build_model
    from tasks.core.artifacts import Artifact
    from tasks.gguf.convert import ConvertSettings, convert
    from tasks.gguf.plan import plan_jobs
    from tasks.gguf.quantize import QuantizeSettings, quantize
    from tasks.merge.stage import MergeSettings, merge
    from tasks.support.tiny_models import cache_root

    out = args.out or RESULTS / f"gpu_check-{args.size}.json"
    check = Check(args, out)
    gpu_missing = [v for k, v in check.missing.items() if v and k in ("cuda", "unsloth")]
    if check.missing.get("llama_gpu") and not _cuda_build_possible(args):
        gpu_missing.append(check.missing["llama_gpu"])
    if gpu_missing and not args.allow_cpu:
        print(
            "gpu_bench --all: this machine lacks what the GPU check needs:\n"
            + "\n".join(f"  - {m}" for m in gpu_missing)
            + "\nrun it on a CUDA machine, or add --allow-cpu to run the CPU-safe parts (the others are skipped)",
            file=sys.stderr,
        )
        return 2
    work = args.work or cache_root() / "gpu-bench"
    run = work / f"check-{args.size}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    cores = os.cpu_count() or 1

    if args.no_build:
        check.steps.append({"step": "build (setup.sh)", "status": "skipped", "seconds": 0.0, "reason": "--no-build"})
    elif check.step("build (setup.sh)", build_step):
        check.missing = requirements()
    check.step("unsloth merge test (tiny bf16 fixture)", lambda: unsloth_fixture_step(run), needs=("cuda", "unsloth"))
    check.step("model API fp16 path", model_api_step, needs=("cuda",))

    made: dict[str, Any] = {}

    def build() -> dict[str, Any]:
        made["base"] = build_model(work / f"base-{args.size}", args.size)
        made["adapter"] = build_adapter(made["base"], work / f"adapter-{args.size}", args.size)
        made["adapter_art"] = Artifact.from_path(made["adapter"], name="adapter", kind="adapter", stage="download")
        return {"base_gb": round(sum(f.stat().st_size for f in made["base"].glob("*.safetensors")) / 1e9, 2)}

    def merge_with(backend: str) -> Callable[[], dict[str, Any]]:
        def go() -> dict[str, Any]:
            settings = MergeSettings(backend=backend, base_model=str(made["base"]), verify="never")
            art = merge(made["adapter_art"], settings, run / f"merged-{backend}")
            made[f"merged-{backend}"] = art
            return {"size_gb": round(art.size / 1e9, 2), "merge_seconds": art.meta.get("merge_seconds")}

        return go

    def compare() -> dict[str, Any]:
        u = made["merged-unsloth"]
        res = {
            **max_ulps(Path(made["merged-streaming"].path), Path(u.path)),
            "unsloth_loaded": u.meta["unsloth_loaded"],
        }
        shutil.rmtree(u.path, ignore_errors=True)  # disk: the 7B model exists four times otherwise
        return res

    def do_convert() -> dict[str, Any]:
        f16 = convert(made["merged-streaming"], ConvertSettings(check_tokenizer=False), run / "gguf", "bench")
        made["f16"] = f16
        shutil.rmtree(made["merged-streaming"].path, ignore_errors=True)
        return {"size_gb": round(f16.size / 1e9, 2)}

    def do_quantize() -> dict[str, Any]:
        f16 = made["f16"]
        plan = plan_jobs(f16.local_path, args.types)
        settings = QuantizeSettings(types=args.types)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=plan.parallel) as pool:
            quants = list(
                pool.map(
                    lambda q: quantize(
                        f16,
                        q,
                        settings,
                        run / "gguf",
                        "bench",
                        threads=plan.threads_for(q),
                        max_buf_size=plan.max_buf_size,
                    ),
                    plan.start_order(args.types),
                )
            )
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        made["quants"] = {q.meta["quant"]: q for q in quants}
        floor = cpu / cores
        return {
            "plan": f"{plan.parallel} at once; threads " + ", ".join(f"{q} {plan.threads_for(q)}" for q in args.types),
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "cpu_floor_s": round(floor, 1),
            "wall_vs_cpu_floor": round(wall / floor, 3) if floor else None,
            "size_gb": round(sum(q.size for q in quants) / 1e9, 2),
        }

    def tps(gpu: bool) -> Callable[[], dict[str, Any]]:
        def go() -> dict[str, Any]:
            q = made["quants"].get("Q4_K_M") or next(iter(made["quants"].values()))
            return {"quant": q.meta["quant"], **generation_tps(q.local_path, gpu, 128 if gpu else 32)}

        return go

    size = args.size
    built = check.step(f"{size} random model + adapter (cached)", build)
    if built:
        streaming = check.step(f"{size} merge: streaming", merge_with("streaming"))
        unsloth = check.step(f"{size} merge: unsloth", merge_with("unsloth"), needs=("cuda", "unsloth"))
        if streaming and unsloth:
            check.step(f"{size} unsloth vs streaming (bf16 ulps)", compare)
        converted = streaming and check.step(f"{size} convert (F16)", do_convert)
        quantized = converted and check.step(f"{size} quantize {'+'.join(args.types)} (plan, all cores)", do_quantize)
        if quantized:
            check.step(f"{size} generation tokens/s, CPU ({cores} threads)", tps(False))
            check.step(f"{size} generation tokens/s, GPU (all layers)", tps(True), needs=("cuda", "llama_gpu"))
    check.facts = summarize(check.steps, size)
    check.save()
    cols = ["step", "status", "seconds", "reason"]
    print(table([{c: str(r.get(c, ""))[:90] for c in cols} for r in check.steps], cols))
    print(json.dumps(check.facts, indent=2))
    print(f"written: {out}")
    return 1 if any(r["status"] == "failed" for r in check.steps) else 0


def _cuda_build_possible(args: argparse.Namespace) -> bool:
    """Whether the build step could still give llama.cpp CUDA (a toolkit is here and the build is not off)."""
    from tasks.support.llama_build import detect

    try:
        return not args.no_build and detect().build == "cuda"
    except SystemExit:
        return False


def summarize(steps: list[dict[str, Any]], size: str) -> dict[str, Any]:
    """The numbers the issue's goals are about, from the recorded steps."""
    by = {r["step"]: r for r in steps}

    def ok(name: str) -> dict[str, Any] | None:
        r = by.get(name)
        return r if r and r["status"] == "ok" else None

    out: dict[str, Any] = {}
    merges = [r["seconds"] for n in ("streaming", "unsloth") if (r := ok(f"{size} merge: {n}"))]
    conv = ok(f"{size} convert (F16)")
    quant = next((r for n, r in by.items() if n.startswith(f"{size} quantize") and r["status"] == "ok"), None)
    if merges and conv and quant:
        out["merge_convert_quantize_s"] = round(min(merges) + conv["seconds"] + quant["wall_s"], 1)
    if r := ok(f"{size} unsloth vs streaming (bf16 ulps)"):
        out["unsloth_vs_streaming_max_ulps"] = r["max_ulps"]
    if quant:
        out["quantize_wall_vs_cpu_floor"] = quant["wall_vs_cpu_floor"]
    cpu = next((r for n, r in by.items() if "tokens/s, CPU" in n and r["status"] == "ok"), None)
    gpu = next((r for n, r in by.items() if "tokens/s, GPU" in n and r["status"] == "ok"), None)
    if cpu:
        out["cpu_tokens_per_s"] = cpu["tokens_per_s"]
    if gpu:
        out["gpu_tokens_per_s"] = gpu["tokens_per_s"]
        if cpu and cpu["tokens_per_s"]:
            out["gpu_vs_cpu_tokens_per_s"] = round(gpu["tokens_per_s"] / cpu["tokens_per_s"], 2)
    return out
