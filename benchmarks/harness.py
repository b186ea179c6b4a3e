"""Measure a command in a child process: wall time, CPU seconds, peak RSS and peak anonymous memory.

Resident memory counts memory-mapped file pages (a model read through mmap shows up in RSS without
being "held"), so we also sample RssAnon from /proc/<pid>/status for the whole process tree: that is
memory the process really owns. psutil has no tree-wide RssAnon, hence this small sampler. It finds the
tree through /proc/<pid>/task/<tid>/children rather than psutil's children(), which scans every process
on the machine: at 20 samples a second that scan cost 4% of a core, taken from the command it measured.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants, from the kernel's per-thread children lists."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            continue
    return out


def measure(
    cmd: list[str],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 3600,
    interval: float = 0.05,
) -> dict[str, Any]:
    """Run `cmd`, sampling the process tree's memory every `interval` seconds."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=full_env, cwd=cwd or ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = {"rss": 0, "anon": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = anon = 0
            for pid in _tree(proc.pid):
                rss += _status_kb(pid, "VmRSS")
                anon += _status_kb(pid, "RssAnon")
            peak["rss"] = max(peak["rss"], rss)
            peak["anon"] = max(peak["anon"], anon)
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    before = os.times()
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        done.set()
        sampler.join()
    after = os.times()
    wall = time.perf_counter() - started
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {
        "cmd": " ".join(cmd),
        "returncode": proc.returncode,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "peak_rss_mb": round(peak["rss"] / 1024, 1),
        "peak_anon_mb": round(peak["anon"] / 1024, 1),
        "tail": out[-2000:],
    }


def machine() -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    line = "| " + " | ".join(c.ljust(widths[c]) for c in cols) + " |"
    sep = "| " + " | ".join("-" * widths[c] for c in cols) + " |"
    body = ["| " + " | ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def python() -> str:
    return sys.executable


# --- helpers of the side-by-side merge benchmarks (merge_bench, fused_bench) ---------------------------------

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MEASURED = ("wall_s", "cpu_s", "peak_rss_mb", "peak_anon_mb", "returncode")


def bench_model(model: dict[str, Any], layers: int, r: int = 16, alpha: int = 32) -> tuple[Path, Path]:
    """(base, adapter): a random model built from `model`'s config with `layers` layers (cached under
    ~/.cache/loraship) and an r=16 LoRA on all its linear layers."""
    from tasks.support.tiny_models import tiny_adapter, tiny_model

    base = tiny_model(**{**model, "layers": layers})
    return base, tiny_adapter(base, r=r, alpha=alpha, targets=LORA_TARGETS)


def warm_inputs(*folders: Path) -> None:
    """Before each contender: flush what the previous one wrote (its write-back otherwise slows the next one's
    writes), then read the inputs once so that every contender starts with them in the page cache (as after the
    download; otherwise the first contender of a model pays the disk read for all of them)."""
    os.sync()
    for folder in folders:
        for f in folder.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass


def weights_size(base: Path) -> tuple[int, int]:
    """(bytes, shards) of a model folder's safetensors."""
    files = list(base.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files), len(files)


def measured_row(
    name: str,
    cmd: list[str],
    env: dict[str, str] | None = None,
    from_output: Callable[[str], dict[str, Any]] | None = None,
    **labels: Any,
) -> dict[str, Any]:
    """`labels` + what `measure` says of `cmd` (the columns every side-by-side table shows) + what `from_output`
    reads from the command's output (its last 2,000 characters); a failed command's last lines go to stderr."""
    r = measure(cmd, env=env)
    if r["returncode"]:
        print(f"!! {name} failed:\n{r['tail']}", file=sys.stderr)
    return {**labels, **{k: r[k] for k in MEASURED}, **(from_output(r["tail"]) if from_output else {})}


def report(
    name: str,
    result: dict[str, Any],
    rows: list[dict[str, Any]],
    ratios: dict[str, float],
    cols: list[str] | None = None,
) -> Path:
    """Save `result` with its rows and ratios as benchmarks/results/<name>.json and print the table (`cols`:
    the measured columns shown, MEASURED unless given)."""
    result["rows"], result["ratios"] = rows, ratios
    out = save(name, result)
    print(table(rows, ["model", "contender", *(cols or MEASURED)]))
    print(json.dumps(ratios, indent=2))
    print(f"written: {out}")
    return out
