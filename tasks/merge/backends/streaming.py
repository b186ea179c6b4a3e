"""The `streaming` merge backend (the default): one tensor in memory at a time, whatever the model's size.

For each base shard, the output shard's header is written first (same tensor names, shapes and order;
the output dtype), then each tensor: unchanged ones are copied byte for byte, targeted ones are read,
widened to float32, updated in place (`W.addmm_(B, A, alpha=scaling)`: no full-size delta is
allocated), narrowed to the output dtype and handed to a writer thread while the next tensor is read ahead.
Peak memory is the adapter plus a few copies of the largest targeted tensor (the one being read, its
float32 working copy, the one being written), never a shard.

Speed: the work is bound by memory traffic, not arithmetic (r is small). Those few copies live in reused
buffers (`Buffers`: fresh large buffers are pages the kernel faults in and zeroes, which cost more than the
merge itself), torch keeps one core free for the reader and writer threads (`compute_threads`), and NaN/inf
is looked for once in each update's factors rather than in every merged tensor.

Numerics: the update is computed and added in float32 and rounded once to the output dtype. peft on CPU
computes the delta in float32 too but rounds it to the base dtype before adding, so the two agree to
within one unit in the last place of a bf16/fp16 weight (tests check exactly that).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from tasks.core.progress import Progress
from tasks.merge import qlora as q4
from tasks.merge.backends.base import MergeBackend, MergeJob
from tasks.merge.plan import WEIGHTS_INDEX, LoraOp, MergePlan, out_dtype_of
from tasks.merge.safetensors_io import DTYPES, FLOAT_DTYPES, OutEntry, StreamingWriter, TensorInfo, read_tensor

log = logging.getLogger("loraship.merge")


def apply_ops(w: Any, ops: list[LoraOp]) -> Any:
    """Apply LoRA (and DoRA) updates to a float32 weight, in place."""
    import torch

    for op in ops:
        a, b = op.A.float(), op.B.float()
        if op.kind == "linear" and not op.fan_in_fan_out:
            w.addmm_(b, a, alpha=op.scaling)  # W[out,in] += s * B @ A
        else:
            w.addmm_(a.t(), b.t(), alpha=op.scaling)  # W[in,out] (or [vocab,dim]) += s * (B @ A)^T
        if op.magnitude is not None:  # DoRA: rescale each output row to the learned magnitude
            rows = w.t() if op.fan_in_fan_out else w
            norm = torch.linalg.norm(rows, dim=1)
            factor = op.magnitude.float() / norm
            w.mul_(factor.view(1, -1) if op.fan_in_fan_out else factor.view(-1, 1))
    return w


def _large_buffers_to_the_os(threshold: int = 1 << 20) -> None:
    """Make glibc serve allocations of 1 MiB and more with mmap, and give them back when freed.

    By default glibc raises its mmap threshold after large frees (up to 32 MiB), after which tensor
    buffers come from the heap, where freed ones linger and fragment: measured here, that made the
    streaming merge's peak grow by ~25% when the model doubled; with a fixed threshold it grew by 7%.
    Set once per process (a no-op where the C library is not glibc).
    """
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def needs_work(plan: MergePlan, info: Any, entry: OutEntry, qlora: q4.QLoraFormat | None) -> bool:
    return (
        info.name in plan.ops
        or info.name in plan.replace
        or info.name in plan.bias_adds
        or entry.dtype != info.dtype
        or (qlora is not None and q4.applies(info.name, info.shape))
    )


def _check_finite(name: str, op: LoraOp) -> None:
    """Refuse an update with NaN/inf in its factors, once per update (its A, B and DoRA magnitude are small).

    A finite update of a finite weight stays finite, so this replaces a pass over every merged float32 tensor
    (a sum of all its values) by one over the adapter's tensors; a NaN the base itself holds is the per-tensor
    check's to report (tasks/merge/tensor_check.py)."""
    import torch

    if getattr(op, "_finite", False):
        return
    parts = [op.A, op.B] + [t for t in (op.magnitude,) if t is not None]
    if not math.isfinite(op.scaling) or not all(bool(torch.isfinite(t).all()) for t in parts):
        raise ValueError(f"merging produced NaN/inf in {name}: the adapter's update of it holds NaN/inf values")
    op._finite = True  # type: ignore[attr-defined]


def merge_threads() -> int:
    """Torch threads for merging: the cores this process may use, minus one for reading and writing."""
    import torch

    return max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0)) - 1))


@contextlib.contextmanager
def compute_threads(n: int | None = None) -> Iterator[None]:
    """Torch's intra-op threads for the merge: the machine's cores minus one (at least one), restored after.

    The reader and writer threads need a core for their copies; torch's own pool on every core then contends
    with them (and with any other process): measured on 2 busy cores, 21 merged tensors (271 MB) took 3.1 s with
    2 threads against 1.1 s with 1. Process-wide while it lasts, like any torch.set_num_threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n or merge_threads())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def source_tensor(plan: MergePlan, info: TensorInfo, fh: Any = None) -> Any:
    """The values a merged tensor starts from: the adapter's saved copy (modules_to_save) or the base's bytes."""
    return plan.replace[info.name] if info.name in plan.replace else read_tensor(info, fh)


def merge_tensor(
    plan: MergePlan,
    info: TensorInfo,
    out_dtype: str,
    src: Any,
    qlora: q4.QLoraFormat | None = None,
    counts: dict[str, int] | None = None,
    work: Any = None,
    out: Any = None,
) -> Any:
    """The merged value of one output tensor, from `src` (source_tensor's): W + s·B·A (DoRA's rescale, lora_bias,
    the QLoRA round trip) in float32, rounded once to the safetensors dtype `out_dtype`.

    The one definition of a merged tensor: the streaming merge writes it to safetensors and the fused
    merge->GGUF path (tasks/merge/fused.py) hands it to llama.cpp's converter, so both give the same bytes.
    `work` / `out` (uint8 tensors, `Buffers`): memory reused for the float32 copy and the result, which then
    lives in `out` (and must be used before `out` is reused); without them both are new.
    """
    import torch

    dtype = getattr(torch, DTYPES[out_dtype][0])
    if out_dtype not in FLOAT_DTYPES:
        return src if out is None else _view(out, src.shape, src.dtype).copy_(src)
    counts = counts if counts is not None else {"merged": 0, "converted": 0, "rounded": 0}
    w = src.to(torch.float32, copy=True) if work is None else _view(work, src.shape, torch.float32).copy_(src)
    del src
    if qlora is not None and q4.applies(info.name, info.shape) and info.name not in plan.replace:
        w = q4.roundtrip(w, qlora)
        counts["rounded"] += 1
    ops = plan.ops.get(info.name, [])
    for op in ops:
        _check_finite(info.name, op)
    apply_ops(w, ops)
    for op in plan.bias_adds.get(info.name, []):
        w.add_(op.bias.float(), alpha=op.scaling)
    counts["merged" if ops or info.name in plan.bias_adds else "converted"] += 1
    return w.to(dtype, copy=work is not None) if out is None else _view(out, w.shape, dtype).copy_(w)


def _view(buf: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """The start of a uint8 buffer as a tensor of `shape` and `dtype`."""
    import math

    import torch

    n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return buf[:n].view(dtype).view(shape)


class Buffers:
    """Working memory the streaming merge reuses from tensor to tensor, grown to the largest one it meets.

    Why: a new buffer of a large tensor is fresh pages (mmap'd, _large_buffers_to_the_os), each faulted in and
    zeroed by the kernel; measured on one 23 MB bf16 weight, widen + update + narrow took 45 ms of CPU with new
    buffers and 10 ms with reused ones. Two read buffers and two output buffers alternate: the reader fills one
    while the merge uses the other, and the writer drains one output while the next is made.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, int], Any] = {}
        self._turn: dict[str, int] = {"read": 0, "out": 0}

    def _get(self, key: tuple[str, int], nbytes: int) -> Any:
        import torch

        buf = self._bufs.get(key)
        if buf is None or buf.numel() < nbytes:
            self._bufs.pop(key, None)
            del buf
            buf = self._bufs[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buf

    def work(self, numel: int) -> Any:
        return self._get(("work", 0), numel * 4)

    def next(self, kind: str, nbytes: int) -> Any:
        """The next of the two `kind` ("read" or "out") buffers, at least nbytes long."""
        turn = self._turn[kind]
        self._turn[kind] = 1 - turn
        return self._get((kind, turn), nbytes)


def shard_layout(plan: MergePlan, target_dtype: str | None) -> list[tuple[Path, list[TensorInfo], list[OutEntry]]]:
    """(base shard, its tensors in file order, their output entries) per shard: merged/ keeps the base's shards,
    tensor order and names, each tensor in its output dtype, plus an untied lm_head right after the embedding it
    starts from. The one layout of merged/: the streaming merge writes it in order, the fused merge's writer
    (tasks/merge/fused.py) at precomputed offsets."""
    by_file: dict[Path, list[TensorInfo]] = {}
    for info in plan.output_tensors().values():  # base tensors + an untied lm_head (from the embedding's bytes)
        by_file.setdefault(info.file, []).append(info)
    out = []
    for shard in plan.shards:
        infos = sorted(by_file.get(shard, []), key=lambda t: (t.start, t.name in plan.added))
        out.append((shard, infos, [OutEntry(t.name, out_dtype_of(t.dtype, target_dtype), t.shape) for t in infos]))
    return out


def write_index(plan: MergePlan, out_dir: Path, weight_map: dict[str, str], total: int) -> None:
    """merged/'s model.safetensors.index.json, when the base has one."""
    if plan.indexed:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def stream_merge(
    plan: MergePlan,
    out_dir: Path,
    target_dtype: str | None,
    qlora: q4.QLoraFormat | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write the merged shards (+ index) into `out_dir`; return counts for the artifact's meta.

    Reading the next targeted tensor, merging the current one and writing the previous one overlap
    (one reader and one writer thread; file I/O and torch kernels release the GIL), with at most one
    tensor in each stage, so memory stays a few tensors while the disk and the CPU both stay busy.
    """
    _large_buffers_to_the_os()
    weight_map: dict[str, str] = {}
    total = 0
    counts = {"merged": 0, "copied": 0, "converted": 0, "rounded": 0}

    bufs = Buffers()

    def load(info: Any, fh: Any, into: Any) -> Any:
        return plan.replace[info.name] if info.name in plan.replace else read_tensor(info, fh, into)

    def read_ahead(info: Any, fh: Any) -> Future:
        into = None if info.name in plan.replace else bufs.next("read", info.nbytes)
        return reader.submit(load, info, fh, into)

    def compute(info: Any, entry: OutEntry, src: Any) -> Any:
        out = bufs.next("out", entry.nbytes)
        return merge_tensor(plan, info, entry.dtype, src, qlora, counts, bufs.work(info.numel), out)

    with (
        compute_threads(),
        ThreadPoolExecutor(1, thread_name_prefix="merge-read") as reader,
        ThreadPoolExecutor(1, thread_name_prefix="merge-write") as wpool,
    ):
        for shard, infos, entries in shard_layout(plan, target_dtype):
            work = [needs_work(plan, i, e, qlora) for i, e in zip(infos, entries)]
            todo = [k for k, w in enumerate(work) if w]
            writer = StreamingWriter(out_dir / shard.name, entries)
            pending: Future | None = None
            try:
                with open(shard, "rb") as rfh, open(shard, "rb") as cfh:
                    reads = iter(todo)
                    nxt = next(reads, None)
                    ahead: Future | None = read_ahead(infos[nxt], rfh) if nxt is not None else None
                    for k, (info, entry) in enumerate(zip(infos, entries)):
                        if not work[k]:
                            job = partial(writer.copy_raw, info.name, info, cfh)
                            counts["copied"] += 1
                        else:
                            assert ahead is not None and nxt == k
                            src = ahead.result()
                            nxt = next(reads, None)
                            ahead = read_ahead(infos[nxt], rfh) if nxt is not None else None
                            out = compute(info, entry, src)
                            del src
                            job = partial(writer.write, info.name, out)
                            del out
                        if pending is not None:
                            pending.result()  # at most one tensor waiting to be written
                        pending = wpool.submit(job)
                        del job
                        weight_map[info.name] = shard.name
                        if progress is not None:
                            progress.advance(info.nbytes)
                    if pending is not None:
                        pending.result()
                writer.close()
            except BaseException:
                if pending is not None:
                    pending.cancel()
                    try:
                        pending.result()
                    except BaseException:
                        pass
                writer.abort()
                raise
            total += writer.total_size
    write_index(plan, out_dir, weight_map, total)
    log.info(
        "streaming merge: %d tensors merged, %d copied unchanged, %d converted%s",
        counts["merged"],
        counts["copied"],
        counts["converted"],
        f", {counts['rounded']} round-tripped through {qlora.describe()}" if qlora and counts["rounded"] else "",
    )
    return {
        "tensors_merged": counts["merged"],
        "tensors_copied": counts["copied"],
        "tensors_converted": counts["converted"],
        "tensors_qlora_roundtrip": counts["rounded"],
        "shards": len(plan.shards),
        "weights_bytes": total,
    }


class StreamingBackend(MergeBackend):
    name = "streaming"
    description = "tensor by tensor, low memory, no GPU; the default"

    def unavailable(self) -> str | None:
        import importlib.util

        return None if importlib.util.find_spec("torch") else "needs torch, which is not installed"

    def run(self, job: MergeJob, out_dir: Path, progress: Progress) -> dict[str, Any]:
        assert job.plan is not None, "the streaming backend reads the base's safetensors headers"
        return stream_merge(job.plan, out_dir, job.target_st, job.qlora, progress)
