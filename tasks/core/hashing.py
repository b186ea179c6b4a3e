"""Content digests of files and folders (sha256), with a stat cache so unchanged big files are not re-read."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

CHUNK = 4 * 1024 * 1024


def sha256_file(path: Path | str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    """Stable JSON for hashing: sorted keys, no whitespace; pydantic models dumped in JSON mode."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest_of(obj: Any) -> str:
    return sha256_bytes(canonical_json(obj).encode("utf-8"))


def iter_files(folder: Path) -> list[Path]:
    """Regular files under `folder`, sorted, relative paths; temporaries of atomic writes excluded."""
    out: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".partial-"))
        for name in sorted(files):
            if name.startswith(".partial-"):
                continue
            out.append((Path(root) / name).relative_to(folder))
    return out


def stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns
