"""Atomic file and folder writes.

A killed run must never leave a half-written file under a final name: every final file is written to a
temporary name in the same folder, fsynced, then renamed over the final name (rename is atomic within one
filesystem). Folders are built under a temporary sibling name and renamed into place the same way.
The standard library has the pieces (os.replace, os.fsync) but no helper that does all three, and the
small libraries that do (atomicwrites) are unmaintained, so this is written here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARKER = ".partial-"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success fsync it and rename it to `final`.

    The caller (or a subprocess) writes the whole file to the yielded path. On an exception the
    temporary file is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_MARKER}{uuid.uuid4().hex[:8]}-{final.name}"
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {final}")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(final: Path | str, data: bytes) -> Path:
    final = Path(final)
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
    return final


def atomic_write_text(final: Path | str, text: str) -> Path:
    return atomic_write_bytes(final, text.encode("utf-8"))


def atomic_write_json(final: Path | str, obj: Any) -> Path:
    return atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path | str) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success it replaces `final` as a whole.

    An existing `final` is moved aside first and deleted only once the new folder is in place, so at
    every instant `final` is either the complete old folder or the complete new one. Files inside are
    fsynced before the rename.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_MARKER}", suffix=f"-{final.name}", dir=final.parent))
    old: Path | None = None
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                p = Path(root) / name
                if p.is_symlink():
                    continue
                with open(p, "rb+") as fh:
                    os.fsync(fh.fileno())
        if final.exists() or final.is_symlink():
            old = final.parent / f"{TMP_MARKER}old-{uuid.uuid4().hex[:8]}-{final.name}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def remove_partials(folder: Path | str) -> list[Path]:
    """Delete temporaries left by a killed run (names starting with the partial marker)."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if p.name.startswith(TMP_MARKER):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed
