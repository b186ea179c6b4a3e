"""Atomic file and folder writes.

A killed run must never leave a half-written file under a final name: every final file is written to a
temporary name in the same folder, fsynced, then renamed over the final name (rename is atomic within one
filesystem). Folders are built under a temporary sibling name and swapped into place in one step (an
atomic exchange of the two names, see `atomic_dir`).
The standard library has the pieces (os.replace, os.fsync) but no helper that does all three, and the
small libraries that do (atomicwrites) are unmaintained, so this is written here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import platform
import shutil
import sys
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

    The new folder and the old one trade places in ONE step (`exchange`: renameat2 RENAME_EXCHANGE on
    Linux, renamex_np RENAME_SWAP on macOS), so at every instant `final` is the complete old folder or the
    complete new one, and a crash at any point leaves at most a `.partial-*` folder beside it. The old
    contents end up under the temporary name and are deleted from there: two writers racing on one folder
    each delete only what their own exchange displaced, never the folder in place. Files inside are
    fsynced before the exchange.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_MARKER}", suffix=f"-{final.name}", dir=final.parent))
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                p = Path(root) / name
                if p.is_symlink():
                    continue
                with open(p, "rb+") as fh:
                    os.fsync(fh.fileno())
        install(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists() or tmp.is_symlink():  # the temporary folder, or what the exchange displaced
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()


def install(new: Path, final: Path) -> None:
    """Put `new` at `final` in one atomic step; afterwards `new` holds what `final` held (if anything)."""
    for _ in range(100):  # another writer may create or remove `final` between our checks: try again
        if not (final.exists() or final.is_symlink()):
            try:
                rename_noreplace(new, final)
                return
            except FileExistsError:
                continue
        try:
            exchange(new, final)
            return
        except FileNotFoundError:
            continue
    raise OSError(f"could not put {new} in place of {final}: it keeps changing")


# --- atomic exchange: one system call that swaps two names ------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # linux/fs.h
_MAC_RENAME_SWAP, _MAC_RENAME_EXCL = 2, 4  # sys/stdio.h
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "arm64": 276, "riscv64": 276, "ppc64le": 357, "s390x": 347}


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no C library to call (not Linux or macOS)
        return None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2) (glibc >= 2.28 exports it; older ones only have the system call). False: unsupported."""
    libc = _libc()
    if libc is None or not sys.platform.startswith("linux"):
        return False
    a, b = os.fsencode(src), os.fsencode(dst)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        rc = fn(_AT_FDCWD, a, _AT_FDCWD, b, ctypes.c_uint(flags))
    else:  # pragma: no cover - old glibc
        nr = _SYS_RENAMEAT2.get(platform.machine())
        if nr is None:
            return False
        rc = libc.syscall(nr, _AT_FDCWD, a, _AT_FDCWD, b, ctypes.c_uint(flags))
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _renamex_np(src: Path, dst: Path, flags: int) -> bool:  # pragma: no cover - macOS
    libc = _libc()
    fn = getattr(libc, "renamex_np", None) if libc is not None and sys.platform == "darwin" else None
    if fn is None:
        return False
    if fn(os.fsencode(src), os.fsencode(dst), ctypes.c_uint(flags)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOTSUP, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def exchange(a: Path, b: Path) -> None:
    """Swap the names `a` and `b` atomically (both must exist).

    Where the platform or filesystem has no exchange, the fallback moves `b` aside and `a` into place:
    two renames with a moment in between in which `b` is missing (logged once).
    """
    if _renameat2(a, b, _RENAME_EXCHANGE) or _renamex_np(a, b, _MAC_RENAME_SWAP):
        return
    _warn_no_exchange(b)
    aside = b.parent / f"{TMP_MARKER}swap-{uuid.uuid4().hex[:8]}-{b.name}"
    os.replace(b, aside)
    os.replace(a, b)
    os.replace(aside, a)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, failing with FileExistsError when `dst` exists (never replacing it)."""
    if _renameat2(src, dst, _RENAME_NOREPLACE) or _renamex_np(src, dst, _MAC_RENAME_EXCL):
        return
    if dst.exists() or dst.is_symlink():  # pragma: no cover - fallback platforms only
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    try:
        os.rename(src, dst)  # onto a non-empty folder this fails; onto an empty one POSIX replaces it
    except OSError as exc:  # pragma: no cover - fallback platforms only
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        raise


@functools.cache
def _warn_no_exchange(where: Path) -> None:
    logging.getLogger("loraship.atomic").warning(
        "no atomic exchange on this system (renameat2/renamex_np) for %s: folders are replaced in two "
        "renames, with a moment in between without the folder",
        where.parent,
    )


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
