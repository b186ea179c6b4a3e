"""Validation of every GGUF file the pipeline writes, before it is handed on.

llama.cpp can write a file that is not what was asked for without failing: for tensors whose rows are
not a multiple of 256 it silently falls back from K-quants to Q5_0/Q8_0, and a killed copy leaves a
truncated file that still has a readable header. So each file is opened with `gguf.GGUFReader` (PyPI
gguf, which reads files of the pinned runtime; the converter's own gguf-py is only used to write):
architecture, tensor count, tensor types (the requested type must really be there), the data section
must end inside the file, the size must be in the expected range against the F16, and a few tokens are
generated through `llama_cpp.Llama` (the runtime that serves it).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from tasks.core.errors import PermanentError
from tasks.gguf.quant_types import base_type, bits_per_weight

log = logging.getLogger("loraship.quantize")


def _field_value(reader: Any, key: str) -> Any:
    f = reader.get_field(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # older readers: decode by hand
        part = f.parts[f.data[0]] if f.data else None
        if part is None:
            return None
        try:
            return bytes(part).decode("utf-8")
        except Exception:
            return part.tolist()


def read_gguf(path: Path | str) -> dict[str, Any]:
    """Header facts of a GGUF file; raises PermanentError when it is not a complete GGUF file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise PermanentError(f"{path} does not exist")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:
        raise PermanentError(
            f"{path.name} is not a readable GGUF file ({type(exc).__name__}: {exc})",
            hint="the file is damaged or truncated: delete it and re-run the stage",
        ) from None
    types: Counter[str] = Counter()
    n_params = 0
    n_bytes = 0
    data_end = 0
    by_name: dict[str, str] = {}
    for t in reader.tensors:
        tname = t.tensor_type.name
        types[tname] += 1
        by_name[t.name] = tname
        n_params += int(t.n_elements)
        n_bytes += int(t.n_bytes)
        data_end = max(data_end, int(t.data_offset) + int(t.n_bytes))
    if data_end > size:
        raise PermanentError(
            f"{path.name} is truncated: its tensors need {data_end} bytes, the file has {size}",
            hint="delete the file and re-run the stage",
        )
    arch = _field_value(reader, "general.architecture")
    info = {
        "path": str(path),
        "size": size,
        "architecture": arch,
        "name": _field_value(reader, "general.name"),
        "file_type": _field_value(reader, "general.file_type"),
        "tensor_count": len(reader.tensors),
        "tensor_types": dict(sorted(types.items())),
        "tensor_type_of": by_name,
        "n_params": n_params,
        "bits_per_weight": round(8.0 * n_bytes / n_params, 3) if n_params else None,
        "has_chat_template": reader.get_field("tokenizer.chat_template") is not None,
        "tokenizer_model": _field_value(reader, "tokenizer.ggml.model"),
        "tokenizer_pre": _field_value(reader, "tokenizer.ggml.pre"),
    }
    del reader
    return info


def validate_gguf(
    path: Path | str,
    *,
    quant: str | None = None,
    architecture: str | None = None,
    tensor_count: int | None = None,
    reference: dict[str, Any] | None = None,
    pure: bool = False,
) -> dict[str, Any]:
    """Check a GGUF against what was asked; return its facts (for artifact meta) or raise PermanentError.

    `reference` is the F16 (or other source) file's facts: architecture, tensor count and size are
    compared with it.
    """
    info = read_gguf(path)
    name = Path(path).name
    problems: list[str] = []
    arch = architecture or (reference or {}).get("architecture")
    if not info["architecture"]:
        problems.append("no general.architecture")
    elif arch and info["architecture"] != arch:
        problems.append(f"architecture {info['architecture']!r}, expected {arch!r}")
    count = tensor_count if tensor_count is not None else (reference or {}).get("tensor_count")
    if info["tensor_count"] == 0:
        problems.append("no tensors")
    elif count is not None and info["tensor_count"] != count:
        problems.append(f"{info['tensor_count']} tensors, expected {count}")
    if quant:
        want = base_type(quant)
        if want and want not in info["tensor_types"]:
            problems.append(
                f"asked for {quant} but no tensor has type {want} (types present: {info['tensor_types']}); "
                "llama.cpp fell back to other "
                "types, which happens when tensor rows are not a multiple of the type's block size (256 for K-quants)"
            )
        elif want and pure:
            matrices = [n for n, t in info["tensor_type_of"].items() if t not in ("F32",)]
            off = [n for n in matrices if info["tensor_type_of"][n] != want]
            if off:
                problems.append(
                    f"pure {quant} asked but {len(off)} tensor(s) have other types, e.g. "
                    f"{off[0]}={info['tensor_type_of'][off[0]]}"
                )
        if reference and want:
            ref_size = reference["size"]
            bpw = bits_per_weight(quant)
            ref_bpw = reference.get("bits_per_weight") or 16.0
            if bpw:
                low = 0.7 * ref_size * bpw / ref_bpw
                high = 1.05 * ref_size
                if not low <= info["size"] <= high:
                    problems.append(
                        f"size {info['size']} bytes is outside the expected {int(low)}-{int(high)} for "
                        f"{quant} from a {ref_size}-byte source"
                    )
    if problems:
        raise PermanentError(
            f"{name} failed validation: " + "; ".join(problems),
            hint=(
                "see the quantize log above; for K-quants on small models use hidden sizes divisible by 256, or "
                "choose Q8_0/Q5_0"
            ),
        )
    info.pop("tensor_type_of", None)
    return info


# llama-cpp-python's Llama(verbose=False) silences llama.cpp by dup2-ing /dev/null over fds 1 and 2 and
# restoring saved copies afterwards; two loads overlapping in threads (the mapped quantize tasks) restore
# each other's /dev/null and the process loses its stdout and stderr for good. One load at a time.
_LLAMA_LOAD = threading.Lock()


def _load(**kwargs: Any) -> Any:
    from llama_cpp import Llama

    with _LLAMA_LOAD:
        return Llama(**kwargs)


def generate_check(path: Path | str, prompt: str = "Hello", n_tokens: int = 4, threads: int = 1) -> dict[str, Any]:
    """Load the file with llama_cpp.Llama and greedily generate `n_tokens` tokens (EOS does not stop it)."""
    return runtime_check(path, prompt=prompt, n_tokens=n_tokens, threads=threads)["generation"]


def runtime_check(
    path: Path | str, *, tokenize: str | None = None, prompt: str = "Hello", n_tokens: int = 4, threads: int = 1
) -> dict[str, Any]:
    """One load of the file through llama_cpp.Llama for both runtime checks: how it tokenizes `tokenize`
    (no BOS, no special-token parsing: what `llama_tokenize` gives, from the same vocabulary) and
    `n_tokens` greedily generated tokens. `{"tokens": [...] or None, "generation": {...}}`.

    A second, vocabulary-only load for the tokenizer check costs 0.2-0.5 s on a big vocabulary for nothing.
    """
    try:
        llm = _load(model_path=str(path), n_ctx=64, n_threads=max(1, threads), n_batch=32, verbose=False, seed=0)
    except Exception as exc:
        raise PermanentError(
            f"llama.cpp cannot load {Path(path).name}: {exc}",
            hint="the file is damaged or written by another llama.cpp version; re-run convert/quantize",
        ) from None
    try:
        ids = list(llm.tokenize(tokenize.encode("utf-8"), add_bos=False, special=False)) if tokenize else None
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
        out: list[int] = []
        for tok in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
            out.append(int(tok))
            if len(out) >= n_tokens:
                break
        text = llm.detokenize(out).decode("utf-8", errors="replace")
    finally:
        llm.close() if hasattr(llm, "close") else None
        del llm
    if len(out) < n_tokens:
        raise PermanentError(f"{Path(path).name} generated {len(out)} of {n_tokens} tokens")
    return {"tokens": ids, "generation": {"prompt": prompt, "tokens": out, "text": text}}


def llama_tokenize(path: Path | str, text: str) -> list[int]:
    """How the runtime tokenizes `text` with this file's vocabulary (no BOS, no special-token parsing)."""
    llm = _load(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
    finally:
        llm.close() if hasattr(llm, "close") else None
