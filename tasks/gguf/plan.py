"""How many quantize jobs run at once, in which order, with how many threads and how much buffer memory each.

What llama.cpp's `llama_model_quantize` does (this runtime's llama-quant.cpp): it maps the source file
and walks the tensors one by one; a tensor's rows go through an f32 conversion buffer and an output
buffer in slabs of at most `max_buf_size` bytes (default 8 GiB, so a whole tensor at once), split over
`nthread` threads per slab; the output is written by one thread, and the source pages of the current
tensor stay mapped until the tensor is done. So one job's peak memory is about: the largest tensor's
source bytes (mapped) + its rows' f32 + output buffers. Between slabs, at tensor starts and while writing,
a job leaves cores idle; a second job running at the same time fills them.

The plan therefore runs several jobs at once (all of them, memory allowing), and caps each job's buffers
with `max_buf_size` so that all jobs together stay within a memory budget: by default 1.4x what one job
alone would use (and at most half the available memory); when even small slabs would not fit, fewer jobs
run at once, costliest first; on a single core, one at a time (there is no idle time to fill).

Threads: the types differ a lot in CPU work (Q4_K_M 8-12x Q8_0, the IQ types far more; measured per
type by benchmarks/quant_costs.py into the cpu_cost column of tasks/data/quant_types.json), and the OS
shares the cores among runnable threads. Equal thread counts would let the cheap jobs finish early
and leave the costliest one alone at the end, where its serial parts idle the cores; so each job gets
threads in proportion to its CPU work (rounded up), out of about twice the cores (the surplus fills the
serial gaps), and the jobs finish at about the same time; the costliest job gets every core, since it
is the one left running at the end. Nothing here is a library's: the numbers come from the
file's tensor shapes and the measured cost table.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.gguf.quant_types import cpu_cost

MIN_SLAB = 16 * 1024 * 1024  # below this a slab has too few rows to keep the threads busy
BASE_RSS = 64 * 1024 * 1024  # the process itself (llama.cpp runtime + Python) counted once
OVERSUBSCRIBE = 2  # threads of all jobs at once per core: the surplus runs while other jobs are in serial parts


@dataclass(frozen=True)
class QuantPlan:
    parallel: int  # jobs at once
    threads: int  # threads of the costliest job (the most any job gets)
    max_buf_size: int  # bytes of slab buffers per job (0: llama.cpp's default, whole tensors)
    est_peak_bytes: int  # estimated peak memory of all jobs together
    est_single_bytes: int  # estimated peak of one job alone with whole-tensor buffers
    reason: str
    order: tuple[str, ...] = ()  # the types in start order, costliest first
    threads_by_type: dict[str, int] = field(default_factory=dict)  # threads of each job, proportional to its CPU work

    def threads_for(self, quant: str) -> int:
        return self.threads_by_type.get(quant.upper(), self.threads)

    def start_order(self, types: Sequence[str]) -> list[str]:
        """`types` in the order their jobs should start (the plan's order; types it does not know last)."""
        rank = {q: i for i, q in enumerate(self.order)}
        return sorted(types, key=lambda q: rank.get(q.upper(), len(rank)))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes), or the cgroup limit if lower; a large default elsewhere."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        usage = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit.isdigit():
            room = int(limit) - usage
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail if avail is not None else 16 * 1024**3


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def largest_tensor(path: Path) -> tuple[int, int]:
    """(elements, source bytes) of the biggest tensor in a GGUF file, read from its header."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    best = max(reader.tensors, key=lambda t: int(t.n_bytes))
    out = int(best.n_elements), int(best.n_bytes)
    del reader
    return out


def _how_many_at_once(parallel: int | None, cores: int, n_jobs: int) -> tuple[int, str]:
    """(jobs at once before memory is considered, why)."""
    if parallel:
        k = min(parallel, n_jobs)
        return k, f"{k} at once as configured"
    if cores == 1:
        # one core has no idle time to fill: a second job would only time-slice the first (measured: 15%
        # more CPU seconds for the same files, and the memory of two jobs)
        return 1, "one at a time: a single core has no idle time for a second job to use"
    k = min(n_jobs, 2 * cores)
    return k, f"{k} at once: one per job, at most two per core"


def _fit_in_memory(
    k: int, configured: bool, budget: int, src_bytes: int, buf_full: int, reason: str
) -> tuple[int, int, int, str]:
    """(jobs at once, bytes of slab buffer per job, llama.cpp's max buffer size (0: its default), why): each job's
    slab buffers shrink so that k jobs fit in `budget`; fewer jobs when slabs would get too small (unless the
    number was configured)."""
    while True:
        per_job = (budget - BASE_RSS - k * src_bytes) // k
        if per_job >= min(MIN_SLAB, buf_full) or k == 1 or configured:
            break
        k -= 1
        reason = (
            f"{k} at once: more would not fit in {budget / 1e6:.0f} MB with slabs of at least {MIN_SLAB // 2**20} MB"
        )
    per_job = max(per_job, min(MIN_SLAB, buf_full))
    if per_job >= buf_full:
        return k, buf_full, 0, reason  # llama.cpp's default: whole tensors fit
    # llama.cpp counts the source row bytes in its slab size too (they are mapped, not allocated)
    max_buf = int(per_job * (buf_full + src_bytes) / max(buf_full, 1))
    reason += f"; buffers capped at {per_job / 1e6:.0f} MB per job to stay within {budget / 1e6:.0f} MB"
    return k, per_job, max_buf, reason


def _thread_shares(
    names: list[str], order: tuple[str, ...], cost: dict[str, float], k: int, cores: int, threads: int | None
) -> tuple[dict[str, int], str]:
    """(threads per type, what to add to the reason)."""
    if threads:
        return {q: threads for q in names}, ""
    if len(names) <= 1 or k == 1:
        return {q: cores for q in names}, ""  # alone on the machine: one thread per core
    # the OS shares the cores by runnable threads: give each job a share of its CPU work, so that the
    # jobs running at once finish together (the k costliest set the scale; later ones are cheaper).
    # Rounded up: a cheap job that ends early hands its cores to the others, one that ends late runs
    # alone on its few threads. The costliest job, the one left at the end, may use every core.
    budget_threads = OVERSUBSCRIBE * cores
    scale = sum(cost[q] for q in order[:k]) or 1.0
    by_type = {q: min(cores, max(1, math.ceil(budget_threads * cost[q] / scale - 1e-9))) for q in names}
    by_type[order[0]] = cores
    return by_type, f"; threads in proportion to each type's CPU work ({', '.join(f'{q} {by_type[q]}' for q in order)})"


def plan_jobs(
    source: Path | None,
    jobs: int | Sequence[str],
    *,
    threads: int | None = None,
    parallel: int | None = None,
    cores: int | None = None,
    memory: int | None = None,
    memory_factor: float = 1.4,
    largest: tuple[int, int] | None = None,
) -> QuantPlan:
    """Plan the quantizations `jobs` (type names, or a count of equally costly jobs) of `source` (or of a
    model whose largest tensor is `largest`=(elements, bytes)). `threads`/`parallel` override the plan."""
    names = [str(q).upper() for q in jobs] if not isinstance(jobs, int) else [f"job{i}" for i in range(jobs)]
    n_jobs = max(1, len(names))
    cores = cores or usable_cores()
    memory = memory if memory is not None else available_memory()
    elems, src_bytes = largest if largest is not None else (largest_tensor(Path(source)) if source else (0, 0))
    # f32 conversion buffer (4 B/element, none for an F32 source) + output rows (at most ~1 B/element for <= Q8_0)
    f32_buf = 0 if elems and src_bytes >= 4 * elems else 4 * elems
    buf_full = f32_buf + elems + 1
    single = BASE_RSS + src_bytes + buf_full
    budget = min(int(memory_factor * single), memory // 2)
    k, reason = _how_many_at_once(parallel, cores, n_jobs)
    k, per_job, max_buf, reason = _fit_in_memory(k, bool(parallel), budget, src_bytes, buf_full, reason)
    peak = BASE_RSS + k * (src_bytes + per_job)
    cost = {q: cpu_cost(q) if not isinstance(jobs, int) else 1.0 for q in names}
    order = tuple(sorted(names, key=lambda q: -cost[q]))  # costliest first: a queue then ends with cheap jobs
    by_type, why_threads = _thread_shares(names, order, cost, k, cores, threads)
    reason += why_threads
    return QuantPlan(
        parallel=k,
        threads=max(by_type.values(), default=cores),
        max_buf_size=max_buf,
        est_peak_bytes=int(peak),
        est_single_bytes=int(single),
        reason=reason,
        order=order,
        threads_by_type=by_type,
    )
