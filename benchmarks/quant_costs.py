"""Measure the CPU cost of every llama.cpp quantization type, for the quantize plan's thread split.

    python -m benchmarks.quant_costs [--types Q4_K_M Q8_0 ...] [--write]

The quantize stage runs several types at once and gives each job threads in proportion to its CPU
work, so that the jobs finish together instead of one long job running alone at the end
(tasks/gguf/plan.py). That needs each type's CPU cost relative to the others; llama.cpp publishes
no such table, so this script measures it: each type quantizes the same random F16 Llama (hidden 1024,
4 layers, vocab 8000: about 67M weights, the shapes of a real model's matrices) with one thread, in a
fresh child process, and the CPU seconds of the `llama_model_quantize` call are divided by the weights.
Types that llama.cpp refuses without an importance matrix (IQ1/IQ2) are measured with a flat one.
`--write` stores the relative costs (Q8_0 = 1.0) in the `cpu_cost` column of the quant-type table,
tasks/data/quant_types.json (tasks/gguf/quant_types.py), which the plan reads.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_f16(work: Path) -> Path:
    """The measuring model's F16 GGUF (cached under `work`)."""
    from benchmarks.quantize_bench import build_model
    from tasks.core.artifacts import Artifact
    from tasks.gguf.convert import ConvertSettings, convert

    f16 = work / "gguf" / "costs-F16.gguf"
    if f16.exists():
        return f16
    model = build_model(work / "llama-costs", hidden=1024, layers=4, intermediate=2816, vocab=8000)
    (work / "gguf").mkdir(parents=True, exist_ok=True)
    convert(
        Artifact.from_path(model, name="merged", kind="merged", stage="merge"),
        ConvertSettings(check_tokenizer=False),
        work / "gguf",
        "costs",
    )
    return f16


def _flat_imatrix(src: Path) -> dict:
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src), "r")
    return {t.name: np.ones(int(t.shape[0]), dtype=np.float32) for t in reader.tensors if len(t.shape) >= 2}


def child(src: str, quant: str, out: str) -> None:
    """One type, one thread: prints the CPU seconds of the llama_model_quantize call (or the failure)."""
    import logging

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    import llama_cpp
    import llama_cpp._logger  # noqa: F401

    from tasks.gguf.quantize import _imatrix_struct, runtime_ftype

    result: dict = {"quant": quant}
    for with_imatrix in (False, True):
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = runtime_ftype(quant)
        p.nthread = 1
        keep = None
        if with_imatrix:
            arr, keep = _imatrix_struct(_flat_imatrix(Path(src)))
            p.imatrix = arr
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(p))
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        del keep
        if rc == 0:
            result.pop("error", None)
            result |= {
                "cpu_s": round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 3),
                "wall_s": round(time.monotonic() - t0, 3),
                "imatrix": with_imatrix,
                "bytes": os.path.getsize(out),
            }
            break
        result["error"] = f"llama_model_quantize returned {rc}"
    Path(out).unlink(missing_ok=True)
    print(json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", nargs="+", default=None, help="default: every quantized type of the table")
    ap.add_argument("--work", default=None, help="cache folder (default: ~/.cache/loraship/bench)")
    ap.add_argument("--write", action="store_true", help="store the relative costs in tasks/data/quant_types.json")
    ap.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    from tasks.gguf.quant_types import parse_quant, quant_types, save_cpu_costs
    from tasks.support.tiny_models import cache_root

    work = Path(a.work) if a.work else cache_root() / "bench"
    src = build_f16(work)
    import gguf

    weights = sum(int(t.n_elements) for t in gguf.GGUFReader(str(src), "r").tensors)
    types = (
        [parse_quant(q) for q in a.types]
        if a.types
        else sorted(q.name for q in quant_types().values() if not q.is_float)
    )
    rows = {}
    for q in types:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.quant_costs",
                "--child",
                str(src),
                q,
                str(work / "gguf" / f"costs-{q}.gguf"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "LLAMA_LOG_DISABLE": "1"},
        )
        line = next((x for x in reversed(out.stdout.splitlines()) if x.startswith("{")), None)
        row = json.loads(line) if line else {"quant": q, "error": (out.stderr or out.stdout)[-300:]}
        if "cpu_s" in row:
            row["ns_per_weight"] = round(row["cpu_s"] / weights * 1e9, 2)
        rows[q] = row
        print(json.dumps(row), flush=True)
    base = rows.get("Q8_0", {}).get("ns_per_weight")
    if a.write:
        if not base:
            raise SystemExit("Q8_0 must be measured to normalise the costs")
        from benchmarks.harness import machine

        costs = {q: round(r["ns_per_weight"] / base, 2) for q, r in rows.items() if "ns_per_weight" in r}
        measured = {
            "command": "python -m benchmarks.quant_costs --write",
            "how": "CPU seconds of llama_model_quantize per weight, one thread, relative to Q8_0",
            "machine": machine(),
            "q8_0_ns_per_weight": base,
        }
        path = save_cpu_costs(costs, measured)
        print(f"wrote the cpu_cost column of {path}")


if __name__ == "__main__":
    main()
