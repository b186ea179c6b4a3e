"""Make llama.cpp's converter process import less of transformers, without changing what it converts.

Why: the converter (convert_hf_to_gguf.py) imports transformers for `AutoConfig` and `AutoTokenizer` only, and on
this project's pinned transformers that costs ~2 s of a ~7 s conversion of a 0.8 GB model (measured in
benchmarks/fused_bench.py's fused contender, where it was the largest fixed cost left):
- ~1.1 s importing `torch.distributed.tensor`: loading a model's config imports transformers' tensor-parallel
  helpers (`transformers.distributed.sharding_utils`) whenever `torch.distributed` is available. A converter is
  one process that never shards a tensor; reporting distributed as unavailable to transformers skips that import.
- ~0.6 s scanning every model file of transformers for its `__all__` (`define_import_structure`, how transformers
  builds its lazy module), which gives the same answer in every process. It is kept on disk, keyed by the
  transformers version and every scanned file's path, size and mtime (a walk of ~0.1 s), and recomputed when any
  of them changes.

Both are applied when transformers' `transformers.utils.import_utils` module is first executed (a meta path finder
wraps that one module's loader), so nothing is imported early and nothing else changes. A name transformers no
longer has is left alone: the converter then imports as it always did, only slower. The GGUF is the same either
way (tests/test_lean_imports.py compares it with the upstream converter's, run without this module).

Standard library only: convert_entry.py runs it before the converter, as a script outside the project's packages.
Why by hand: no library caches transformers' import structure or trims its imports; this is 2 attribute swaps.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

#: The transformers module whose two functions are swapped.
TARGET = "transformers.utils.import_utils"
#: Environment variable that turns this off (`0`): the converter then imports transformers unchanged.
ENV = "LORASHIP_LEAN_CONVERTER"
CACHE_VERSION = 1


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


def install(cache_dir: Path | None) -> None:
    """Swap the two functions when transformers is imported; `cache_dir` holds the import structure (None: not
    kept, only the distributed import is skipped)."""
    if TARGET in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return  # transformers already imported (nothing to gain) or installed twice
    sys.meta_path.insert(0, _Finder(cache_dir))


class _Finder(importlib.abc.MetaPathFinder):
    """Finds TARGET as Python would, and patches the module right after its code ran."""

    def __init__(self, cache_dir: Path | None) -> None:
        self.cache_dir = cache_dir

    def find_spec(
        self, name: str, path: Any, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module
        cache_dir = self.cache_dir

        def exec_module(module: ModuleType) -> None:
            run(module)
            patch(module, cache_dir)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign] - this spec's loader only
        return spec


def patch(module: ModuleType, cache_dir: Path | None) -> None:
    if callable(getattr(module, "is_torch_distributed_available", None)):
        module.is_torch_distributed_available = _not_distributed  # type: ignore[attr-defined]
    define = getattr(module, "define_import_structure", None)
    if cache_dir is not None and callable(define):
        module.define_import_structure = _kept(define, cache_dir, _transformers_version())  # type: ignore[attr-defined]


def _not_distributed() -> bool:
    """transformers' `is_torch_distributed_available`, for a process that never distributes a tensor."""
    return False


def _transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "unknown"


def _kept(define: Callable[..., Any], cache_dir: Path, version: str) -> Callable[..., Any]:
    """`define` (transformers' `define_import_structure(module_path, prefix=None)`), its answers kept on disk."""

    @functools.lru_cache
    def define_import_structure(module_path: Any, prefix: str | None = None) -> Any:
        root = Path(module_path)
        fingerprint = tree_fingerprint(root, version, prefix)
        # one file per scanned folder, version and prefix: a changed file overwrites its folder's answer
        name = hashlib.sha256(f"{version}\0{root.resolve()}\0{prefix}".encode()).hexdigest()[:24]
        path = cache_dir / f"import-structure-{name}.json"
        kept = _read(path, fingerprint)
        if kept is not None:
            return kept
        structure = define(module_path, prefix)
        _write(path, fingerprint, structure)
        return structure

    return define_import_structure


def tree_fingerprint(root: Path, version: str, prefix: str | None) -> str:
    """sha256 over what the scan reads: every .py file under `root` by relative path, size and mtime."""
    top = str(root.resolve())
    h = hashlib.sha256(f"{CACHE_VERSION}\0{version}\0{top}\0{prefix}\0".encode())
    for folder, dirs, files in os.walk(top):
        dirs.sort()
        rel = folder[len(top) :]
        for name in sorted(files):
            if name.endswith(".py"):
                st = os.stat(os.path.join(folder, name))
                h.update(f"{rel}/{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def encode(structure: dict[frozenset[str], dict[str, set[str]]]) -> list[list[Any]]:
    """JSON form of an import structure: [[sorted backends, {module: sorted names}], ...] (no pickle on disk)."""
    return [[sorted(k), {m: sorted(v) for m, v in mods.items()}] for k, mods in structure.items()]


def decode(data: list[list[Any]]) -> dict[frozenset[str], dict[str, set[str]]]:
    return {frozenset(k): {m: set(v) for m, v in mods.items()} for k, mods in data}


def _read(path: Path, fingerprint: str) -> dict[frozenset[str], dict[str, set[str]]] | None:
    try:
        data = json.loads(path.read_text())
        if data.get("fingerprint") != fingerprint:
            return None
        return decode(data["structure"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # absent or unreadable: scan again


def _write(path: Path, fingerprint: str, structure: Any) -> None:
    """Atomically (a reader never sees half a file); a cache that cannot be written is only slower."""
    tmp: str | None = None
    try:
        payload = json.dumps({"fingerprint": fingerprint, "structure": encode(structure)})
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".import-structure-")
        with os.fdopen(fd, "w") as fh:
            fh.write(payload)
        os.replace(tmp, path)
        tmp = None
    except (OSError, TypeError, ValueError, AttributeError):
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
