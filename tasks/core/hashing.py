"""Content digests of files and folders (sha256), with a stat cache so unchanged big files are not re-read."""

from __future__ import annotations

import hashlib
import json
import os
import threading
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


_DIGESTS: dict[tuple[str, int, int], str] = {}


def content_digest(path: Path | str) -> str:
    """sha256 of a file (a folder: of its files' paths and digests); "missing" when there is nothing there.

    Memoized by (path, size, mtime): a cache key computed for every task of a run reads a big file once.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        return digest_of([[rel.as_posix(), content_digest(p / rel)] for rel in iter_files(p)])
    if not p.is_file():
        return "missing"
    size, mtime = stat_key(p)
    memo = (str(p.resolve()), size, mtime)
    if memo not in _DIGESTS:
        _DIGESTS[memo] = sha256_file(p)
    return _DIGESTS[memo]


def git_head(path: Path | str) -> str:
    """The commit a git checkout is at, read from its .git files (no git binary needed); "" when unknown."""
    root = Path(path).expanduser()
    git = root / ".git"
    if git.is_file():  # a worktree or submodule: "gitdir: <path>"
        text = git.read_text().strip()
        git = (root / text.removeprefix("gitdir:").strip()).resolve() if text.startswith("gitdir:") else git
    head = git / "HEAD"
    if not head.is_file():
        return ""
    ref = head.read_text().strip()
    if not ref.startswith("ref:"):
        return ref  # detached
    name = ref.removeprefix("ref:").strip()
    common = git / "commondir"
    bases = [git, (git / common.read_text().strip()).resolve()] if common.is_file() else [git]
    for base in bases:
        if (base / name).is_file():
            return (base / name).read_text().strip()
        packed = base / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + name):
                    return line.split()[0]
    return ""


def stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class AppendHasher:
    """sha256 of a file another process writes from its first byte to its last, taken while it grows.

    For writers that only append (llama.cpp's GGUFWriter writes header, metadata, tensor infos and then the
    tensor data in order, never seeking back), hashing what has landed so far, on a thread, spares reading
    the whole output again once the writer is done: for a 15 GB F16 that is seconds on a core the writer
    leaves idle. `finish()` (after the writer exited) reads the rest and returns the digest only when the
    file is still the inode that was followed (its descriptor stays open, so the number is not reused)
    and holds exactly the bytes hashed; otherwise None, and the caller hashes the file as usual. Do not
    use it for writers that seek back (llama_model_quantize rewrites its header at the end).
    """

    def __init__(self, path: Path | str, *, poll_s: float = 0.02, chunk: int = CHUNK) -> None:
        self.path = Path(path)
        self.poll_s = poll_s
        self.chunk = chunk
        self._fd: int | None = None
        self._h = hashlib.sha256()
        self.done = 0
        self._broken = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sha256-{self.path.name}", daemon=True)

    def start(self) -> AppendHasher:
        self._thread.start()
        return self

    def _drain(self) -> bool:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                return False
        if os.fstat(self._fd).st_size < self.done:  # truncated and rewritten: not an append-only writer
            self._broken = True
        got = False
        while not self._broken and (data := os.pread(self._fd, self.chunk, self.done)):
            self._h.update(data)
            self.done += len(data)
            got = True
        return got

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._drain():
                if self._broken:
                    return
                self._stop.wait(self.poll_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def finish(self) -> str | None:
        """The digest of the file as it is now (the writer must have exited), or None when it cannot vouch."""
        self.stop()
        try:
            self._drain()
            if self._fd is None or self._broken:
                return None
            held, now = os.fstat(self._fd), os.stat(self.path, follow_symlinks=False)
            if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino) or held.st_size != self.done:
                return None
            return self._h.hexdigest()
        except OSError:
            return None
        finally:
            self.close()

    def close(self) -> None:
        self.stop()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
