"""Stage 4, quantize: the F16 GGUF into several llama.cpp types, in parallel.

Each type is one call of llama.cpp's `llama_model_quantize` (through llama-cpp-python, the same
llama.cpp that serves the files; the call releases the GIL, so jobs run in threads of one process, as
mapped Prefect tasks). How many run at once and with how many threads each is planned from the cores,
the memory and the F16's largest tensor (tasks/gguf/plan.py). Every output is written under a
temporary name, renamed when complete and validated (tasks/gguf/validate.py): the requested tensor
type must be present (llama.cpp silently falls back from K-quants on odd shapes), sizes must be
plausible, and the file must generate a few tokens.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, field_validator

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_path
from tasks.core.constants import TASKS_DATA
from tasks.core.disk import disk_preflight
from tasks.core.errors import ConfigError, PermanentError
from tasks.core.settings import FILE_CONTENT, StrictModel
from tasks.core.stage import stage_task
from tasks.core.threads import ContextPool
from tasks.core.vocab import ArtifactKind, Stage
from tasks.gguf.convert import file_progress, gguf_name
from tasks.gguf.plan import QuantPlan, plan_jobs
from tasks.gguf.quant_types import bits_per_weight, parse_quant, quant_types, recommended

if TYPE_CHECKING:
    from tasks.gguf.imatrix import Imatrix

STAGE = Stage.QUANTIZE
#: the calibration text when none is given: the evaluation's bundled held-out text
DEFAULT_CALIBRATION = TASKS_DATA / "heldout.txt"
log = logging.getLogger("loraship.quantize")
TOOLS = ("llama-cpp-python", "gguf")


def ftype_names() -> dict[str, int]:
    """The installed llama.cpp's file type names (Q4_K_M, Q8_0, F16, ...) -> llama_ftype value.

    The runtime's own view, for checking the table (tasks/gguf/quant_types.py) against it; everything else
    asks the table.
    """
    import llama_cpp

    out: dict[str, int] = {}
    for attr in dir(llama_cpp):
        for prefix in ("LLAMA_FTYPE_MOSTLY_", "LLAMA_FTYPE_ALL_"):
            if attr.startswith(prefix):
                out[attr[len(prefix) :]] = int(getattr(llama_cpp, attr))
    return out


def tensor_type_names() -> dict[str, int]:
    """ggml tensor type names (Q6_K, Q8_0, F16, ...) -> ggml_type value, for the per-tensor overrides."""
    import llama_cpp

    return {
        a[len("GGML_TYPE_") :]: int(getattr(llama_cpp, a))
        for a in dir(llama_cpp)
        if a.startswith("GGML_TYPE_") and a != "GGML_TYPE_COUNT"
    }


def runtime_ftype(quant: str) -> int:
    """The table's llama_ftype value for `quant`, checked against the installed llama.cpp's own numbering."""
    qt = quant_types()[quant]
    runtime = ftype_names().get(quant)
    if runtime != qt.ftype:
        problem = "does not know it" if runtime is None else f"numbers it {runtime}, the table {qt.ftype}"
        raise PermanentError(
            f"quantization type {quant}: the installed llama.cpp {problem}",
            hint="install the pinned llama-cpp-python (./setup.sh), or correct tasks/data/quant_types.json",
        )
    return qt.ftype


def parse_tensor_type(name: str, field: str) -> str:
    names = tensor_type_names()
    q = str(name).strip().upper()
    if q not in names:
        raise ConfigError(f"{field}: unknown tensor type {name!r}; valid types: {', '.join(sorted(names))}")
    return q


class QuantizeSettings(StrictModel):
    """The `quantization:` section: which llama.cpp types to make from the F16, and how."""

    types: list[str] = Field(
        default_factory=recommended,
        description=(
            "llama.cpp file types (any case), e.g. Q4_K_M, Q5_K_M, Q6_K, Q8_0, IQ4_XS; the valid ones and advice "
            "on each: tasks/data/quant_types.json"
        ),
    )
    threads: int | None = Field(
        None,
        ge=1,
        description=(
            "threads per job; None: each job gets threads in proportion to its type's CPU work "
            "(cpu_cost in tasks/data/quant_types.json), about twice the cores in all"
        ),
    )
    parallel: int | None = Field(
        None,
        ge=1,
        description=(
            "jobs at once; None: chosen from cores, memory and the model (performance.parallelism also sets it)"
        ),
    )
    output_tensor_type: str | None = Field(None, description="tensor type for output.weight (e.g. Q8_0, F16)")
    token_embedding_type: str | None = Field(None, description="tensor type for token_embd.weight")
    leave_output_tensor: bool = Field(False, description="do not quantize output.weight (keep the F16 values)")
    pure: bool = Field(False, description="every matrix gets the requested type (no K-quant mixtures)")
    imatrix: Annotated[str | None, FILE_CONTENT] = Field(
        None, description="an importance matrix file (GGUF imatrix from llama-imatrix) for better low-bit quants"
    )
    compute_imatrix: bool = Field(
        False,
        description=(
            "compute an importance matrix from `calibration` with llama.cpp's llama-imatrix (once per F16 and text, "
            "cached; the same for every type); `imatrix` (a file) wins when both are set"
        ),
    )
    calibration: Annotated[str | None, FILE_CONTENT] = Field(
        None,
        description=(
            "text file the importance matrix is computed on (like what the model will see); None: the "
            "evaluation's held-out text"
        ),
    )
    calibration_chunks: int = Field(
        128, ge=1, description="at most this many windows of the calibration text go into the imatrix"
    )
    generate_tokens: int = Field(
        4, ge=0, description="tokens each file must generate through llama_cpp.Llama in validation (0: skip)"
    )
    split_max_size: str | None = Field(
        None,
        description=(
            "also write each GGUF bigger than this (e.g. 45GB; the Hub refuses files over 50 GB) as llama.cpp "
            "split shards in gguf/<model>-<QUANT>/ (tasks/gguf/split.py); null: no split"
        ),
    )

    @field_validator("types")
    @classmethod
    def _types(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one type, e.g. [Q4_K_M]")
        out: list[str] = []
        for name in v:
            try:
                q = parse_quant(name)
            except ConfigError as exc:
                raise ValueError(exc.message) from None
            if q not in out:
                out.append(q)
        return out

    @field_validator("split_max_size", mode="before")
    @classmethod
    def _split_size(cls, v: Any) -> str | None:
        if v is None:
            return v
        from tasks.gguf.split import parse_size

        try:
            parse_size(v)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
        return str(v).strip()

    @field_validator("output_tensor_type", "token_embedding_type")
    @classmethod
    def _tensor_type(cls, v: str | None, info: Any) -> str | None:
        if v is None:
            return v
        try:
            return parse_tensor_type(v, info.field_name)
        except ConfigError as exc:
            raise ValueError(exc.message) from None


# --- imatrix ----------------------------------------------------------------------------------------


def load_imatrix(path: Path) -> dict[str, Any]:
    """Read an imatrix GGUF (llama-imatrix's format: `<tensor>.in_sum2` and `<tensor>.counts`) into per-tensor means."""
    import gguf
    import numpy as np

    if not path.is_file():
        raise PermanentError(f"quantization.imatrix: {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:
        raise PermanentError(
            f"quantization.imatrix: {path} is not a GGUF imatrix file ({exc})",
            hint="make one with llama.cpp's llama-imatrix (the legacy .dat format is not read)",
        ) from None
    sums: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = np.asarray(t.data, dtype=np.float32)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = np.asarray(t.data, dtype=np.float32)
    if not sums:
        raise PermanentError(
            f"quantization.imatrix: {path} holds no *.in_sum2 tensors", hint="make it with llama.cpp's llama-imatrix"
        )
    out = {}
    for name, s in sums.items():
        c = counts.get(name)
        n_mat = s.shape[0] if s.ndim > 1 else 1
        s2 = s.reshape(n_mat, -1)
        cnt = (c.reshape(-1)[:n_mat] if c is not None else np.ones(n_mat, dtype=np.float32)).reshape(n_mat, 1)
        out[name] = np.ascontiguousarray((s2 / np.maximum(cnt, 1.0)).reshape(-1), dtype=np.float32)
    return out


def _imatrix_struct(values: dict[str, Any]) -> tuple[Any, list[Any]]:
    import llama_cpp

    arr = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
    keep: list[Any] = []
    for i, (name, data) in enumerate(values.items()):
        b = name.encode()
        keep += [b, data]
        arr[i].name = b
        arr[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = data.size
    arr[len(values)].name = None
    return arr, keep


def resolve_imatrix(
    f16: Artifact, settings: QuantizeSettings, out_dir: Path, *, threads: int | None = None
) -> Imatrix | None:
    """The importance matrix this quantization uses: the `imatrix` file, else (with `compute_imatrix`) the one
    computed from `calibration` (cached in `out_dir/imatrix/`), else None."""
    from tasks.gguf.imatrix import compute_imatrix, imatrix_facts

    if settings.imatrix:
        path = Path(settings.imatrix).expanduser()
        load_imatrix(path)  # a missing or foreign file fails here, naming quantization.imatrix
        return imatrix_facts(path)
    if not settings.compute_imatrix:
        return None
    calibration = Path(settings.calibration).expanduser() if settings.calibration else DEFAULT_CALIBRATION
    return compute_imatrix(f16, calibration, out_dir, chunks=settings.calibration_chunks, threads=threads)


def with_imatrix(
    f16: Artifact, settings: QuantizeSettings, out_dir: Path, *, threads: int | None = None
) -> QuantizeSettings:
    """`settings` with `imatrix` pointing at the computed matrix, so that parallel quantizations of one F16
    share it (computed here once) and their cache keys cover its content."""
    if settings.imatrix or not settings.compute_imatrix:
        return settings
    im = resolve_imatrix(f16, settings, out_dir, threads=threads)
    assert im is not None
    return settings.model_copy(update={"imatrix": str(im.path)})


def _kv_overrides(values: dict[str, str | int]) -> Any:
    """llama_model_kv_override entries (string or integer) ending with an empty key, as llama.cpp reads them."""
    import llama_cpp

    arr = (llama_cpp.llama_model_kv_override * (len(values) + 1))()
    for i, (key, value) in enumerate(values.items()):
        arr[i].key = key.encode()[:127]
        if isinstance(value, int):
            arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            arr[i].value.val_i64 = value
        else:
            arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            arr[i].value.val_str = str(value).encode()[:127]
    return arr


# --- the work ---------------------------------------------------------------------------------------


class OrderedSlots:
    """At most `size` jobs at once, started in the plan's order (rank 0 first) among those waiting.

    A semaphore would let whichever thread wakes first start; the plan wants the costliest types to start
    first, so that the jobs left for the end are the cheap ones. Only waiting jobs count: a job that never
    arrives (a cache hit) blocks nobody.
    """

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self.running = 0
        self.waiting: set[int] = set()
        self.cond = threading.Condition()

    def acquire(self, rank: int) -> None:
        with self.cond:
            self.waiting.add(rank)
            self.cond.wait_for(lambda: self.running < self.size and rank == min(self.waiting))
            self.waiting.discard(rank)
            self.running += 1
            self.cond.notify_all()

    def release(self) -> None:
        with self.cond:
            self.running -= 1
            self.cond.notify_all()


_SLOTS: dict[str, OrderedSlots] = {}
_SLOTS_LOCK = threading.Lock()


def _slots_for(key: str, size: int) -> OrderedSlots:
    with _SLOTS_LOCK:
        gate = _SLOTS.get(f"{key}/{size}")
        if gate is None:
            gate = _SLOTS[f"{key}/{size}"] = OrderedSlots(size)
        return gate


def _quantize_params(
    f16: Artifact, q: str, settings: QuantizeSettings, out_dir: Path, n_threads: int, max_buf_size: int
) -> tuple[Any, Any, list[Any]]:
    """(llama.cpp's quantize parameters for `q` from the settings, the importance matrix used or None, the ctypes
    objects the parameters point into: keep them alive until llama_model_quantize returns)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = runtime_ftype(q)
    params.nthread = n_threads
    params.max_buf_size = max(0, int(max_buf_size))
    params.pure = settings.pure
    params.quantize_output_tensor = not settings.leave_output_tensor
    types = tensor_type_names()
    if settings.output_tensor_type:
        params.output_tensor_type = types[settings.output_tensor_type]
    if settings.token_embedding_type:
        params.token_embedding_type = types[settings.token_embedding_type]
    keep: list[Any] = []
    im = resolve_imatrix(f16, settings, out_dir, threads=n_threads)
    if im is not None:
        arr, keep = _imatrix_struct(load_imatrix(im.path))
        params.imatrix = arr
        overrides = _kv_overrides(im.metadata())
        params.kv_overrides = overrides
        keep += [arr, overrides]
    return params, im, keep


def quantize(
    f16: Artifact,
    quant: str,
    settings: QuantizeSettings,
    out_dir: Path,
    model_name: str,
    *,
    threads: int | None = None,
    max_buf_size: int = 0,
) -> Artifact:
    """One llama.cpp quantization of the GGUF `f16` into `out_dir/{model}-{QUANT}.gguf`, validated."""
    import llama_cpp

    from tasks.gguf.validate import generate_check, read_gguf, validate_gguf

    q = parse_quant(quant)
    # llama.cpp's per-tensor lines: llama-cpp-python 0.3.36 forwards llama.cpp's INFO lines at WARNING,
    # so only ERROR keeps them out of the run log (unless the user set a level).
    rt_log = logging.getLogger("llama-cpp-python")
    if rt_log.level == logging.NOTSET:
        rt_log.setLevel(logging.ERROR)
    src = Path(f16.path)
    if not src.is_file():
        raise PermanentError(
            f"the F16 GGUF {src} is missing",
            hint="re-run the convert stage (or run without pipeline.cleanup.delete_f16)",
        )
    reference = read_gguf(src)
    final = Path(out_dir) / gguf_name(model_name, q)
    bpw = bits_per_weight(q) or bits_per_weight("Q8_0") or 8.5
    expected = int(reference["size"] * min(1.0, (bpw + 1.0) / (reference["bits_per_weight"] or 16.0)))
    disk_preflight(Path(out_dir), expected, final.name)
    n_threads = threads or settings.threads or os.cpu_count() or 1
    params, im, keep = _quantize_params(f16, q, settings, Path(out_dir), n_threads, max_buf_size)
    started = time.monotonic()
    with atomic_path(final) as tmp:
        with file_progress(tmp, expected, f"quantize {final.name}"):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise PermanentError(
                f"llama.cpp could not quantize {src.name} to {q} (llama_model_quantize returned {rc})",
                hint="see llama.cpp's log above; IQ types below 4 bits need quantization.imatrix",
            )
    seconds = time.monotonic() - started
    del keep
    try:
        info = validate_gguf(final, quant=q, reference=reference, pure=settings.pure)
        meta: dict[str, Any] = {
            "quant": q,
            "architecture": info["architecture"],
            "tensor_count": info["tensor_count"],
            "tensor_types": info["tensor_types"],
            "bits_per_weight": info["bits_per_weight"],
            "size_vs_source": round(info["size"] / reference["size"], 4),
            "llama_cpp_commit": f16.meta.get("llama_cpp_commit"),
            "threads": n_threads,
            "seconds": round(seconds, 2),
            "imatrix": im is not None,
        }
        if im is not None:
            meta["imatrix_info"] = im.record()
        if settings.generate_tokens:
            meta["generation"] = generate_check(final, n_tokens=settings.generate_tokens, threads=min(n_threads, 4))
    except Exception:
        final.unlink(missing_ok=True)  # never leave an invalid file under a final name
        raise
    log.info(
        "%s: %s in %.1fs with %d threads, %.2f bits/weight, types %s",
        final.name,
        f"{info['size'] / 1e6:.1f} MB",
        seconds,
        n_threads,
        info["bits_per_weight"] or 0,
        info["tensor_types"],
    )
    return Artifact.from_path(
        final,
        name=f"gguf:{q}",
        kind=ArtifactKind.GGUF,
        stage=STAGE,
        inputs=[f16],
        settings=settings,
        tools=TOOLS,
        meta=meta,
    )


@stage_task(STAGE)
def quantize_task(
    f16: Artifact,
    quant: str,
    settings: QuantizeSettings,
    out_dir: Path,
    model_name: str,
    _threads: int | None = None,
    _max_buf: int = 0,
    _slots: int = 0,
    _plan_key: str = "",
    _rank: int = 0,
) -> Artifact:
    """Prefect task for one type; mapped over the types. At most `_slots` run at once (0: no limit), in
    the order of `_rank`.

    The underscored parameters (the plan) are left out of the cache key: they change speed, not the file.
    """
    if _slots <= 0:
        return quantize(f16, quant, settings, out_dir, model_name, threads=_threads, max_buf_size=_max_buf)
    gate = _slots_for(_plan_key, _slots)
    gate.acquire(_rank)
    try:
        return quantize(f16, quant, settings, out_dir, model_name, threads=_threads, max_buf_size=_max_buf)
    finally:
        gate.release()


def quantize_all(
    f16: Artifact, settings: QuantizeSettings, out_dir: Path, model_name: str, plan: QuantPlan | None = None
) -> list[Artifact]:
    """Every type of `settings.types`, planned and run in threads, without Prefect (tests, scripts)."""
    plan = plan or plan_jobs(Path(f16.path), settings.types, threads=settings.threads, parallel=settings.parallel)
    settings = with_imatrix(f16, settings, Path(out_dir), threads=plan.threads)
    order = plan.start_order(settings.types)
    with ContextPool(max_workers=plan.parallel, thread_name_prefix="quantize") as pool:  # FIFO: costliest first
        futures = {
            q: pool.submit(
                quantize,
                f16,
                q,
                settings,
                out_dir,
                model_name,
                threads=plan.threads_for(q),
                max_buf_size=plan.max_buf_size,
            )
            for q in order
        }
        return [futures[q].result() for q in settings.types]


__all__ = [
    "QuantizeSettings",
    "quantize",
    "quantize_task",
    "quantize_all",
    "parse_quant",
    "ftype_names",
    "plan_jobs",
    "QuantPlan",
]
