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
