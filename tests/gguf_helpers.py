"""Tiny real GGUF files for tests: converted and quantized with the project's own stages, cached.

Built from a base model folder (tasks/support/tiny_models.py) with tasks.gguf.convert.convert and
tasks.gguf.quantize.quantize_all, once per (model folder, types, stage code, llama-cpp-python version), in
`~/.cache/loraship/ggufs/` (or `$LORASHIP_CACHE/ggufs`), under a file lock and written to a temporary
folder renamed into place, so parallel sessions build once and never see half-written files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

QUANTS = ("Q8_0", "Q4_K_M", "Q5_K_M")


def _key(base: Path, outtype: str, types: tuple[str, ...], vocab_pre: str | None) -> str:
    from tasks.core.caching import module_code_version

    # The quantize stage's code version covers convert, gguf_validate, the toolchain and the plan too.
    payload = [
        str(Path(base).resolve()),
        outtype,
        list(types),
        vocab_pre,
        importlib.metadata.version("llama-cpp-python"),
        module_code_version("tasks.gguf.quantize"),
    ]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def tiny_ggufs(
    base: Path,
    *,
    name: str | None = None,
    outtype: str = "f16",
    types: tuple[str, ...] = QUANTS,
    vocab_pre: str | None = None,
) -> dict[str, Path]:
    """{"F16": path, "Q8_0": path, ...} for the model folder `base` (built once, cached)."""
    from tasks.core.artifacts import Artifact
    from tasks.gguf.convert import ConvertSettings, convert
    from tasks.gguf.quantize import QuantizeSettings, quantize_all
    from tasks.support.tiny_models import build_once, cache_root

    base = Path(base)
    name = name or base.name.split("-")[0]

    def build(tmp: Path) -> None:
        merged = Artifact.from_path(base, name="merged", kind="merged", stage="merge")
        f16 = convert(merged, ConvertSettings(outtype=outtype, vocab_pre=vocab_pre), tmp, name)
        quants = quantize_all(f16, QuantizeSettings(types=list(types)), tmp, name)
        index = {a.meta["quant"]: Path(a.path).name for a in [f16, *quants]}
        meta = {a.meta["quant"]: a.meta for a in [f16, *quants]}
        (tmp / "index.json").write_text(json.dumps({"files": index, "meta": meta}, indent=2, default=str))

    out = build_once(
        cache_root() / "ggufs" / f"{name}-{_key(base, outtype, tuple(types), vocab_pre)}", build, marker="index.json"
    )
    index = json.loads((out / "index.json").read_text())["files"]
    return {q: out / fname for q, fname in index.items()}


def tiny_gguf_meta(paths: dict[str, Path]) -> dict[str, dict]:
    """The artifact meta recorded when the files were built (tensor types, commit, generation sample)."""
    folder = next(iter(paths.values())).parent
    return json.loads((folder / "index.json").read_text())["meta"]
