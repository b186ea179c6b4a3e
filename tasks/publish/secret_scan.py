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


def _gguf_metadata_end(path: Path) -> int:
    try:
        from gguf import GGUFReader

        return int(GGUFReader(str(path)).data_offset)
    except Exception:  # not readable as GGUF: scan it like any other file
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
