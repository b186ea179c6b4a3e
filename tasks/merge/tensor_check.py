"""The per-tensor check of a merge: sampled rows recomputed in float32 from the base and the adapter.

It runs after every merge, whatever the model's size (it reads a few rows per tensor, not the model), and is
independent of how the merge was done: for each tensor the merged files hold, a sample of rows is recomputed
from the base file's bytes and the adapter's tensors (W + s·B·A, DoRA's rescale, lora_bias, a saved module,
the 4-bit round trip of a QLoRA base) in float32, and compared with the bytes the backend wrote. A backend that
drops an update, applies a wrong scale to one layer, transposes, mixes tensors up or writes a wrong dtype fails
here, naming the tensor.

Tolerance: the written value may differ from the float32 value by one unit in the last place of the output
dtype at the weight's magnitude (rounding once gives half of that; peft rounds its delta before adding, which
can give one), plus float32 accumulation error for the matmul (r x eps32 x sum |s·B||A|). Errors are reported
in output-dtype ulps.

`TensorVerifier.check_tensor(name, tensor)` takes a tensor as produced (HF layout, output dtype), so a merge
that writes something else than safetensors (issue 21's fused merge->GGUF) can check each tensor as it makes
it; `check_folder(out_dir)` reads the rows back from safetensors files.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.merge import qlora as q4
from tasks.merge.plan import WEIGHTS_INDEX, MergePlan, read_json
from tasks.merge.safetensors_io import DTYPES, FLOAT_DTYPES, TensorInfo, read_header

#: Rows recomputed per tensor (plus the first and the last row, and rows an embedding LoRA changed).
DEFAULT_ROWS = 8
EPS32 = 2.0**-23
MANTISSA_BITS = {"BF16": 7, "F16": 10, "F32": 23, "F64": 52}
MIN_EXP = {"BF16": -126, "F16": -14, "F32": -126, "F64": -1022}


def ulp(x: Any, st_dtype: str) -> Any:
    """The spacing of `st_dtype` numbers at |x| (subnormal spacing below the smallest normal)."""
    import torch

    m = x.abs().double().clamp_min(2.0 ** MIN_EXP[st_dtype])
    return torch.exp2(torch.floor(torch.log2(m)) - MANTISSA_BITS[st_dtype])


@dataclass
class TensorResult:
    name: str
    rows: int
    max_ulps: float  # largest |written - expected| in output-dtype ulps (after the float32 allowance)
    ok: bool
    detail: str = ""


@dataclass
class CheckReport:
    """What the per-tensor check found; `meta()` goes into the merged artifact."""

    results: list[TensorResult] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[TensorResult]:
        return [r for r in self.results if not r.ok]

    def problem(self) -> str | None:
        if self.missing:
            return f"the merged files lack {len(self.missing)} tensor(s): {', '.join(self.missing[:5])}"
        if self.unexpected:
            return f"the merged files hold tensors the merge does not make: {', '.join(self.unexpected[:5])}"
        bad = self.failures
        if not bad:
            return None
        worst = max(bad, key=lambda r: r.max_ulps)
        names = ", ".join(r.name for r in bad[:5])
        return (
            f"{len(bad)} merged tensor(s) differ from W + s·B·A recomputed from the base and adapter files: {names} "
            f"(worst {worst.name}: {worst.detail})"
        )

    def meta(self) -> dict[str, Any]:
        worst = max(self.results, key=lambda r: r.max_ulps, default=None)
        return {
            "tensors_checked": len(self.results),
            "rows_checked": sum(r.rows for r in self.results),
            "max_err_ulps": round(worst.max_ulps, 3) if worst else None,
            "worst_tensor": worst.name if worst else None,
            "failed": [r.name for r in self.failures],
            "seconds": round(self.seconds, 3),
        }


def _read_rows(info: TensorInfo, rows: list[int], fh: Any) -> Any:
    """Rows of a stored tensor (a 1-D tensor is one row), as float32 (integers kept as they are)."""
    import torch

    tdtype = getattr(torch, DTYPES[info.dtype][0])
    if len(info.shape) < 2 or rows == list(range(info.shape[0])):  # one read for a whole tensor
        fh.seek(info.start)
        data = bytearray(fh.read(info.nbytes))
        rows_of = 1 if len(info.shape) < 2 else info.shape[0]
        empty = torch.empty(1, 0, dtype=tdtype)
        t = torch.frombuffer(data, dtype=tdtype).reshape(rows_of, -1) if info.nbytes else empty
    else:
        row_bytes = info.nbytes // info.shape[0]
        out = []
        for r in rows:
            fh.seek(info.start + r * row_bytes)
            out.append(torch.frombuffer(bytearray(fh.read(row_bytes)), dtype=tdtype))
        t = torch.stack(out).reshape(len(rows), *info.shape[1:]).reshape(len(rows), -1)
    return t.float() if info.dtype in FLOAT_DTYPES else t


class TensorVerifier:
    """Recompute sampled rows of merged tensors from the base files and the plan's adapter tensors."""

    def __init__(
        self, plan: MergePlan, qlora: q4.QLoraFormat | None = None, rows: int = DEFAULT_ROWS, seed: int = 0
    ) -> None:
        self.plan, self.qlora, self.n_rows, self.seed = plan, qlora, rows, seed
        self._handles: dict[Path, Any] = {}

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    def __enter__(self) -> TensorVerifier:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _fh(self, path: Path) -> Any:
        if path not in self._handles:
            self._handles[path] = open(path, "rb")
        return self._handles[path]

    def sample_rows(self, name: str) -> list[int]:
        """Deterministic rows of `name`: first, last, random ones, and rows an embedding LoRA changed."""
        import torch

        info = self.plan.output_tensors()[name]
        if len(info.shape) < 2:
            return [0]
        n = info.shape[0]
        g = torch.Generator().manual_seed(self.seed + sum(name.encode()))
        picked = {0, n - 1, *torch.randint(0, n, (self.n_rows,), generator=g).tolist()}
        for op in self.plan.ops.get(name, []):
            if op.kind == "embedding":  # rows whose lora_embedding_A column is non-zero: the tokens trained
                changed = torch.nonzero(op.A.abs().sum(dim=0)).flatten()
                if len(changed):
                    pick = torch.randperm(len(changed), generator=g)[: self.n_rows]
                    picked.update(changed[pick].tolist())
        return sorted(picked)

    def _needs_whole(self, name: str, info: TensorInfo) -> bool:
        """The 4-bit round trip (block absmax, double quant's mean) and DoRA on [in, out] need the whole tensor."""
        if self.qlora is not None and q4.applies(name, info.shape) and name not in self.plan.replace:
            return True
        return any(op.magnitude is not None and op.fan_in_fan_out for op in self.plan.ops.get(name, []))

    def expected(self, name: str, rows: list[int]) -> tuple[Any, Any]:
        """(float32 expected rows, float32 magnitude bound for the accumulation error) of merged tensor `name`."""
        import torch

        plan = self.plan
        info = plan.output_tensors()[name]
        if name in plan.replace:
            src = plan.replace[name].float()
            base = src.reshape(1, -1) if src.dim() < 2 else src[rows].reshape(len(rows), -1)
        elif self._needs_whole(name, info):
            whole = _read_rows(info, list(range(info.shape[0])), self._fh(info.file)).reshape(info.shape)
            if self.qlora is not None and q4.applies(name, info.shape):
                whole = q4.roundtrip(whole, self.qlora)
            return self._apply_whole(name, whole, rows)
        else:
            base = _read_rows(info, rows, self._fh(info.file))
        w = base.clone()
        bound = base.abs()
        for op in plan.ops.get(name, []):
            a, b = op.A.float(), op.B.float()
            if op.kind == "linear" and not op.fan_in_fan_out:
                delta, mag = b[rows] @ a, b[rows].abs() @ a.abs()  # W[out, in] += s B A
            else:  # W[in, out] (Conv1D) or [vocab, dim] (embedding) += s (B A)^T
                delta, mag = a[:, rows].t() @ b.t(), a[:, rows].abs().t() @ b.abs().t()
            w += op.scaling * delta
            bound = bound + abs(op.scaling) * mag
            if op.magnitude is not None:  # DoRA: each output row rescaled to its learned magnitude
                w = w * (op.magnitude.float()[rows] / torch.linalg.norm(w, dim=1)).view(-1, 1)
                bound = bound.maximum(w.abs())
        for op in plan.bias_adds.get(name, []):
            w = w + op.scaling * op.bias.float().reshape(1, -1)
            bound = bound + abs(op.scaling) * op.bias.float().abs().reshape(1, -1)
        return w, bound

    def _apply_whole(self, name: str, whole: Any, rows: list[int]) -> tuple[Any, Any]:
        import torch

        w = whole.reshape(whole.shape[0], -1).clone() if whole.dim() >= 2 else whole.reshape(1, -1).clone()
        bound = w.abs()
        for op in self.plan.ops.get(name, []):
            a, b = op.A.float(), op.B.float()
            if op.kind == "linear" and not op.fan_in_fan_out:
                w += op.scaling * (b @ a)
                bound = bound + abs(op.scaling) * (b.abs() @ a.abs())
            else:
                w += op.scaling * (b @ a).t()
                bound = bound + abs(op.scaling) * (b.abs() @ a.abs()).t()
            if op.magnitude is not None:
                cols = w.t() if op.fan_in_fan_out else w
                factor = op.magnitude.float() / torch.linalg.norm(cols, dim=1)
                w = w * (factor.view(1, -1) if op.fan_in_fan_out else factor.view(-1, 1))
                bound = bound.maximum(w.abs())
        for op in self.plan.bias_adds.get(name, []):
            w = w + op.scaling * op.bias.float().reshape(1, -1)
        if whole.dim() < 2:
            return w, bound
        return w[rows], bound[rows]

    def compare(self, name: str, rows: list[int], written: Any, st_dtype: str) -> TensorResult:
        """Judge written rows (float32, or raw integers) against the recomputed ones."""
        import torch

        info = self.plan.output_tensors()[name]
        if st_dtype not in FLOAT_DTYPES or info.dtype not in FLOAT_DTYPES:
            want = _read_rows(info, rows, self._fh(info.file))
            ok = bool(torch.equal(written, want))
            return TensorResult(name, len(rows), 0.0 if ok else math.inf, ok, "" if ok else "integer values differ")
        exp, bound = self.expected(name, rows)
        written = written.float().reshape(exp.shape)
        if not torch.isfinite(written).all():
            return TensorResult(name, len(rows), math.inf, False, "NaN/inf written")
        r_total = sum(op.r for op in self.plan.ops.get(name, [])) + 2
        slack = r_total * EPS32 * bound.double()
        # one ulp at the operands' scale: rounding once (streaming) gives half; peft rounds its delta, then the sum
        spacing = ulp(torch.maximum(torch.maximum(exp.abs(), written.abs()), bound), st_dtype)
        err = (written.double() - exp.double()).abs()
        excess = (err - slack).clamp_min(0) / spacing
        worst = float(excess.max()) if excess.numel() else 0.0
        # a backend holding the model in the base dtype (peft) also rounds the 4-bit round trip itself: half an ulp
        ok = worst <= (1.5 if self.qlora is not None else 1.0)
        detail = "" if ok else f"off by {worst:.3g} {st_dtype} ulps (|diff| up to {float(err.max()):.3g})"
        return TensorResult(name, len(rows), worst, ok, detail)

    def check_tensor(self, name: str, tensor: Any) -> TensorResult:
        """Check a merged tensor as produced (HF layout, the output dtype), e.g. by a fused merge->GGUF path."""
        from tasks.merge.safetensors_io import TORCH_TO_ST

        rows = self.sample_rows(name)
        t = tensor.reshape(1, -1) if tensor.dim() < 2 else tensor[rows].reshape(len(rows), -1)
        st = TORCH_TO_ST.get(str(tensor.dtype).removeprefix("torch."), "I64")
        return self.compare(name, rows, t.float() if st in FLOAT_DTYPES else t, st)

    def check_folder(self, out_dir: Path) -> CheckReport:
        """Check every tensor of the merged safetensors files in `out_dir` (a few rows each, read by offset)."""
        started = time.monotonic()
        written = _written_tensors(out_dir)
        want = self.plan.output_tensors()
        report = CheckReport(
            missing=sorted(set(want) - set(written)), unexpected=sorted(set(written) - set(want) - _ignorable(want))
        )
        try:
            for name in want:
                if name not in written:
                    continue
                out = written[name]
                if out.shape != want[name].shape:
                    report.results.append(
                        TensorResult(name, 0, math.inf, False, f"shape {out.shape}, the base has {want[name].shape}")
                    )
                    continue
                rows = self.sample_rows(name)
                got = _read_rows(out, rows, self._fh(out.file))
                report.results.append(self.compare(name, rows, got, out.dtype))
        finally:
            self.close()
        report.seconds = time.monotonic() - started
        return report


def _ignorable(want: dict[str, TensorInfo]) -> set[str]:
    # a backend that saves a tied model may also write the tied head; it is checked by the logits
    return {"lm_head.weight"} if "lm_head.weight" not in want else set()


def _written_tensors(out_dir: Path) -> dict[str, TensorInfo]:
    index = out_dir / WEIGHTS_INDEX
    files = (
        sorted({out_dir / f for f in read_json(index).get("weight_map", {}).values()})
        if index.exists()
        else sorted(out_dir.glob("*.safetensors"))
    )
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        tensors.update(read_header(f).tensors)
    return tensors


def check_merged_folder(
    plan: MergePlan, out_dir: Path, qlora: q4.QLoraFormat | None = None, rows: int = DEFAULT_ROWS
) -> CheckReport:
    """The per-tensor check of a merged folder (the stage calls this after every merge)."""
    return TensorVerifier(plan, qlora, rows).check_folder(out_dir)
