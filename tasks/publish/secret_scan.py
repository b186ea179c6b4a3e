"""The secret scan of a staged folder, before anything in it is uploaded.

Every file of the folder is searched for the secrets this process resolved (tokens, keys: see
tasks/core/scrub.py `register_secret`), Hugging Face and other token shapes, and private-key blocks. A
hit refuses the push, naming the file and what kind of secret it holds (never the secret itself).

Weights are big and their bytes are numbers, not text: for a GGUF only its metadata (header, key-values,
tensor table: everything before the tensor data, where a chat template or a stray setting could carry a
token) is scanned, for a safetensors file its JSON header; every other file is scanned whole.
"""

from __future__ import annotations

import struct
from pathlib import Path

from tasks.core.errors import PermanentError
from tasks.core.hashing import iter_files
from tasks.core.scrub import find_secrets

MAX_TEXT_SCAN = 256 << 20  # a "text" file bigger than this is scanned in its first 256 MB only


_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_metadata_end(path: Path) -> int:
    """Where a GGUF's tensor data begins (everything before is header, key-values and tensor table).

    Walked here from the format (header, typed key-values, tensor infos, alignment) rather than with
    gguf-py's GGUFReader, which builds an object per vocabulary entry: 4x the time of grep-ing the whole
    file for a 32k vocabulary. Anything unexpected: the whole file (up to MAX_TEXT_SCAN) is scanned."""
    import mmap

    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if mm[:4] != b"GGUF":
                return MAX_TEXT_SCAN
            _version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
            pos, alignment = 24, 32

            def skip(vtype: int, pos: int) -> int:
                if vtype in _GGUF_SCALAR:
                    return pos + _GGUF_SCALAR[vtype]
                if vtype == _GGUF_STRING:
                    return pos + 8 + struct.unpack_from("<Q", mm, pos)[0]
                if vtype == _GGUF_ARRAY:
                    item, n = struct.unpack_from("<IQ", mm, pos)
                    pos += 12
                    if item in _GGUF_SCALAR:
                        return pos + n * _GGUF_SCALAR[item]
                    for _ in range(n):
                        pos = skip(item, pos)
                    return pos
                raise ValueError(f"GGUF value type {vtype}")

            for _ in range(n_kv):
                klen = struct.unpack_from("<Q", mm, pos)[0]
                key = mm[pos + 8 : pos + 8 + klen]
                pos += 8 + klen
                vtype = struct.unpack_from("<I", mm, pos)[0]
                if key == b"general.alignment" and vtype == 4:
                    alignment = struct.unpack_from("<I", mm, pos + 4)[0] or 32
                pos = skip(vtype, pos + 4)
            for _ in range(n_tensors):
                pos += 8 + struct.unpack_from("<Q", mm, pos)[0]  # name
                n_dims = struct.unpack_from("<I", mm, pos)[0]
                pos += 4 + 8 * n_dims + 4 + 8  # dims, type, offset
            return min(-(-pos // alignment) * alignment, len(mm))
    except (OSError, ValueError, struct.error):  # not a readable GGUF: scan it like any other file
        return MAX_TEXT_SCAN


def _safetensors_header_end(path: Path) -> int:
    with open(path, "rb") as fh:
        raw = fh.read(8)
    if len(raw) < 8:
        return MAX_TEXT_SCAN
    return 8 + struct.unpack("<Q", raw)[0]


def scanned_bytes(path: Path) -> bytes:
    """The part of `path` that can hold text: a weights file's metadata, anything else whole."""
    end = MAX_TEXT_SCAN
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        end = _gguf_metadata_end(path)
    elif suffix == ".safetensors":
        end = _safetensors_header_end(path)
    with open(path, "rb") as fh:
        return fh.read(min(end, MAX_TEXT_SCAN))


def scan_folder(folder: Path) -> list[tuple[str, list[str]]]:
    """[(relative path, kinds of secret found)] for every file of `folder` that holds one."""
    hits = []
    for rel in iter_files(folder):
        text = scanned_bytes(folder / rel).decode("latin-1")  # bytes as they are: any secret is ASCII
        found = find_secrets(text)
        if found:
            hits.append((rel.as_posix(), found))
    return hits


def refuse_secrets(folder: Path, what: str) -> None:
    """PermanentError naming the files of `folder` that hold a secret (the push is refused)."""
    hits = scan_folder(folder)
    if not hits:
        return
    listed = "; ".join(f"{rel} ({', '.join(kinds)})" for rel, kinds in hits[:10])
    raise PermanentError(
        f"refusing to publish {what}: the staged folder {folder} holds secrets: {listed}",
        hint=(
            "remove the secret from that file at its source (the training output, the card template, the "
            "settings), then run again; rotate the secret if it was ever published"
        ),
    )
