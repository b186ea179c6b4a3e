"""Optional split of a GGUF into llama.cpp shards of a maximum size (`quantization.split_max_size`).

The Hugging Face Hub refuses files over 50 GB, so big GGUFs are published as llama.cpp's split format:
`<model>-<QUANT>-00001-of-0000N.gguf`, each a valid GGUF with `split.no` (u16), `split.count` (u16)
and `split.tensors.count` (i32), the full metadata in the first shard, whole tensors in file order;
`llama_cpp.Llama(model_path=<first shard>)` finds the others beside it. The writing is gguf-py's own
GGUFWriter (its `split_max_size`), run in a subprocess (tasks/gguf/split_entry.py) with the
gguf-py of the resolved llama.cpp converter tree, the same commit as the runtime; the PyPI `gguf`
(which has the same writer option) when no converter tree is available without a download.

The shards go into `gguf/<model>-<QUANT>/` and that folder is the artifact `gguf-split:<QUANT>` (kind
`gguf-split`). The unsplit `gguf:<QUANT>` file is kept: serving, health, evaluation and LM Studio /
Ollama (which cannot import split files) use it; only publishing needs the shards.

Every shard set is checked before it is handed on: split keys, every source tensor exactly once and
in order, every shard at most the maximum size (GGUFWriter's budget counts tensor bytes only, so it
is given the maximum less the source's whole header and padding), and llama.cpp loading the first
shard generates the same greedy tokens as the unsplit file.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_dir
from tasks.core.errors import ConfigError, PermanentError
from tasks.core.stage import stage_task
from tasks.core.vocab import ArtifactKind, Stage

STAGE = Stage.QUANTIZE
log = logging.getLogger("loraship.quantize")
ENTRY = Path(__file__).with_name("split_entry.py")
TOOLS = ("llama-cpp-python", "gguf")
SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "KB": 10**3,
    "M": 10**6,
    "MB": 10**6,
    "G": 10**9,
    "GB": 10**9,
    "T": 10**12,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(value: str | int | float, field: str = "quantization.split_max_size") -> int:
    """'500MB' -> 500_000_000, '2GB' -> 2_000_000_000, '1.5GiB', 4096 (bytes). K/M/G/T are decimal (as
    llama.cpp's gguf-split and the Hub's 50 GB limit), KiB/MiB/GiB binary."""
    if isinstance(value, bool):
        raise ConfigError(f"{field}: {value!r} is not a size; write e.g. 500MB, 2GB or 45GB")
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = m.group(2).upper() if m else ""
        if not m or unit not in _UNITS:
            raise ConfigError(
                f"{field}: {value!r} is not a size; write a number with a unit, e.g. 500MB, 2GB, 45GB (or KiB/MiB/GiB)"
            )
        n = float(m.group(1)) * _UNITS[unit]
    if n < 1024:
        raise ConfigError(f"{field}: {value!r} is too small (at least 1 KiB; shards hold whole tensors)")
    return int(n)


def shard_folder(out_dir: Path, model_name: str, quant: str) -> Path:
    return Path(out_dir) / f"{model_name}-{quant.upper()}"


def _gguf_py_env() -> tuple[dict[str, str] | None, str]:
    """Environment putting the converter tree's gguf-py first, or None (PyPI gguf) when there is none."""
    from tasks.gguf.toolchain import resolve_converter

    try:
        conv = resolve_converter(allow_download=False)
    except Exception as exc:  # no cached tree and no checkout named: the PyPI gguf writer splits the same way
        log.info(
            "splitting with the PyPI gguf package (no llama.cpp converter tree available: %s)",
            getattr(exc, "message", exc),
        )
        return None, "pypi"
    return conv.env(), conv.describe()


def _header_overhead(src: Path) -> tuple[int, int, list[tuple[str, int]]]:
    """(bytes before the data section, alignment, [(tensor name, padded bytes)]) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(src), "r")
    align_field = reader.get_field("general.alignment")
    align = int(align_field.contents()) if align_field is not None else 32
    tensors = [(t.name, int(t.n_bytes)) for t in reader.tensors]
    return int(reader.data_offset), align, tensors


def check_shards(folder: Path, src_tensors: list[str], max_bytes: int) -> list[dict[str, Any]]:
    """Check a folder of shards against the source's tensor list; return per-shard facts or raise."""
    import gguf

    files = sorted(p for p in folder.iterdir() if p.suffix == ".gguf")
    problems: list[str] = []
    out: list[dict[str, Any]] = []
    seen: list[str] = []
    for i, p in enumerate(files):
        m = SHARD_RE.match(p.name)
        if not m or int(m.group("no")) != i + 1 or int(m.group("count")) != len(files):
            problems.append(f"{p.name} is not shard {i + 1} of {len(files)}")
            continue
        reader = gguf.GGUFReader(str(p), "r")
        keys = {
            k: (
                reader.get_field(k).contents() if reader.get_field(k) is not None else None,
                reader.get_field(k).types[0].name if reader.get_field(k) is not None else None,
            )
            for k in ("split.no", "split.count", "split.tensors.count")
        }
        want = {
            "split.no": (i, "UINT16"),
            "split.count": (len(files), "UINT16"),
            "split.tensors.count": (len(src_tensors), "INT32"),
        }
        for k, v in want.items():
            if keys[k] != v:
                problems.append(f"{p.name}: {k} is {keys[k]}, expected {v}")
        names = [t.name for t in reader.tensors]
        data_end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        size = p.stat().st_size
        if data_end > size:
            problems.append(f"{p.name} is truncated")
        if size > max_bytes:
            problems.append(f"{p.name} has {size} bytes, more than the maximum {max_bytes}")
        if not names:
            problems.append(f"{p.name} holds no tensor")
        seen += names
        out.append(
            {
                "file": p.name,
                "size": size,
                "tensors": len(names),
                "has_metadata": i == 0 and reader.get_field("general.architecture") is not None,
            }
        )
        del reader
    if len(files) < 2:
        problems.append(f"{len(files)} shard(s) written, expected at least 2")
    if seen != list(src_tensors):
        missing = sorted(set(src_tensors) - set(seen))
        dup = sorted({n for n in seen if seen.count(n) > 1})
        problems.append(
            f"the shards do not hold the source's tensors once each in order (missing {missing[:3]}, "
            f"duplicated {dup[:3]})"
        )
    if out and not out[0]["has_metadata"]:
        problems.append(f"{out[0]['file']} (the first shard) lacks the model metadata")
    if problems:
        raise PermanentError(
            f"split of {folder.name} failed validation: " + "; ".join(problems[:6]),
            hint="delete the folder and re-run the quantize stage",
        )
    return out


def _tensor_budget(src: Path, max_size: str | int, max_bytes: int) -> tuple[int, list[tuple[str, int]]]:
    """(the tensor bytes one shard may hold, the file's (tensor, bytes) list); a tensor larger than that budget
    is a PermanentError saying the smallest split_max_size that works (a tensor is never split across shards)."""
    overhead, align, tensors = _header_overhead(src)
    # GGUFWriter counts tensor bytes only: leave room for a whole header (the first shard carries all the
    # metadata), every tensor's alignment padding and the split keys, so no shard exceeds the maximum.
    budget = max_bytes - overhead - align * (len(tensors) + 1) - 1024
    biggest = max(tensors, key=lambda t: t[1])
    if budget < biggest[1]:
        need = biggest[1] + (max_bytes - budget)
        raise PermanentError(
            (
                f"quantization.split_max_size {max_size!r} ({max_bytes} bytes) cannot hold tensor {biggest[0]} "
                f"({biggest[1]} bytes) plus the metadata ({overhead} bytes): a tensor is never split across "
                "shards"
            ),
            hint=f"set quantization.split_max_size to at least {need} bytes ({need / 1e6:.1f}MB)",
        )
    return budget, tensors


def _same_generation(first: Path, gguf: Artifact, n_tokens: int, threads: int) -> dict[str, Any]:
    """Generate from the first shard (llama.cpp loads the rest beside it); the tokens must be the unsplit file's."""
    from tasks.gguf.validate import generate_check

    generation = generate_check(first, n_tokens=n_tokens, threads=threads)
    expected = (gguf.meta.get("generation") or {}).get("tokens")
    if expected and len(expected) == len(generation["tokens"]) and expected != generation["tokens"]:
        raise PermanentError(
            (
                f"{first.name} (first shard) generates {generation['tokens']} but the unsplit {Path(gguf.path).name} "
                f"generated {expected}"
            ),
            hint="the split changed the model: report this with the llama.cpp commit",
        )
    return generation


def split_gguf(
    gguf: Artifact, max_size: str | int, out_dir: Path, model_name: str, *, generate_tokens: int = 4, threads: int = 2
) -> Artifact | None:
    """Split the GGUF artifact `gguf` into `out_dir/<model>-<QUANT>/` shards of at most `max_size` bytes.

    Returns the folder artifact `gguf-split:<QUANT>`, or None when the file is not bigger than the
    maximum (nothing to split).
    """
    max_bytes = parse_size(max_size)
    src = Path(gguf.path)
    if not src.is_file():
        raise PermanentError(f"the GGUF {src} to split is missing", hint="re-run the quantize stage")
    quant = str(gguf.meta.get("quant") or src.stem.rsplit("-", 1)[-1]).upper()
    size = src.stat().st_size
    if size <= max_bytes:
        log.info("%s: %d bytes, not above quantization.split_max_size (%d): not split", src.name, size, max_bytes)
        return None
    budget, tensors = _tensor_budget(src, max_size, max_bytes)
    folder = shard_folder(out_dir, model_name, quant)
    env, gguf_py = _gguf_py_env()
    started = time.monotonic()
    with atomic_dir(folder) as tmp:
        cmd = [sys.executable, str(ENTRY), str(src), str(tmp / f"{folder.name}.gguf"), str(budget)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise PermanentError(
                f"splitting {src.name} failed (exit {proc.returncode}): {tail}",
                hint="see the error; the unsplit file is unchanged",
            )
        for line in proc.stderr.splitlines():
            log.debug("gguf-py: %s", line)
        shards = check_shards(tmp, [t[0] for t in tensors], max_bytes)
        generation = (
            _same_generation(tmp / shards[0]["file"], gguf, generate_tokens, threads) if generate_tokens else None
        )
    seconds = time.monotonic() - started
    meta: dict[str, Any] = {
        "quant": quant,
        "first_shard": shards[0]["file"],
        "shards": shards,
        "split_count": len(shards),
        "split_max_size": max_bytes,
        "unsplit": src.name,
        "gguf_py": gguf_py,
        "llama_cpp_commit": gguf.meta.get("llama_cpp_commit"),
        "seconds": round(seconds, 2),
        **({"generation": generation} if generation else {}),
    }
    log.info(
        "%s: split into %d shards of at most %.1f MB in %.1fs (%s)",
        src.name,
        len(shards),
        max_bytes / 1e6,
        seconds,
        folder,
    )
    return Artifact.from_path(
        folder,
        name=f"gguf-split:{quant}",
        kind=ArtifactKind.GGUF_SPLIT,
        stage=STAGE,
        inputs=[gguf],
        settings={"split_max_size": max_bytes},
        tools=TOOLS,
        meta=meta,
    )


@stage_task(STAGE)
def split_task(
    gguf: Artifact, max_size: str, out_dir: Path, model_name: str, generate_tokens: int = 4, _threads: int = 2
) -> Artifact | None:
    """Prefect task: one GGUF into shards (mapped over the files above the maximum)."""
    return split_gguf(gguf, max_size, out_dir, model_name, generate_tokens=generate_tokens, threads=_threads)


def first_shard(artifact: Artifact) -> Path:
    """The path llama.cpp loads a `gguf-split` artifact from (the other shards sit beside it)."""
    return Path(artifact.path) / artifact.meta["first_shard"]


__all__ = ["parse_size", "split_gguf", "split_task", "check_shards", "first_shard", "shard_folder"]
