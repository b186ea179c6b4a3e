"""Moving the bytes for the download stage: rsync over ssh, or paramiko SFTP when rsync is missing.

rsync is what users would run by hand and it resumes well: with `--partial-dir` an interrupted file is
kept, and the next run uses it as the basis of rsync's delta transfer, so only about the remainder
crosses the wire. It is started as an argument list (never through a shell); its `--info=progress2`
output feeds tasks.core.progress.Progress and its `--stats` give the bytes actually received.

Verification overlaps the copy: `LandingHasher` follows each file rsync is receiving (rsync writes the new
file sequentially into a temporary `.<name>.XXXXXX` beside its final name, then renames it) and hashes the
bytes as they land, so no file is read again after the transfer. A digest only counts when the final
file is the very inode that was followed (its descriptor is held open, so the number cannot be reused)
and holds exactly the bytes hashed; anything else (a tiny file renamed before it was seen, rsync's own
re-send of a file) is hashed after the transfer as before.

The SFTP fallback (no rsync on one side, the seed's "SCP fallback") appends to a partial file from its
byte offset and hashes while it writes, so a resumed file is not read twice. Partial data lives under
`.partial-rsync/` and `.partial-sftp/` inside the destination: the `.partial-` prefix keeps it out of
artifact listings (tasks.core.hashing.iter_files) and final names only ever hold complete files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.errors import PermanentError, TransientError
from tasks.core.progress import Progress
from tasks.core.threads import context_thread
from tasks.download.ssh import RemoteFile, RemoteSession, local_target, parse_rsync_version
from tasks.download.vocab import BytesHook

log = logging.getLogger("loraship.download")

RSYNC_PARTIAL = ".partial-rsync"
SFTP_PARTIAL = ".partial-sftp"
_PROGRESS2 = re.compile(rb"^\s*(\d+)\s+\d+%")
# rsync exit codes worth a retry: socket/protocol/IPC errors, killed by a signal, timeouts, vanished
# source files (the box is still writing), and 255 (ssh lost the connection).
_RSYNC_TRANSIENT = {10, 12, 14, 20, 21, 24, 30, 35, 255}
_SUFFIX = re.compile(r"[A-Za-z0-9]{6}")  # rsync's mkstemp suffix of a temporary `.<name>.XXXXXX`
_SFTP_WINDOW = 8 << 20  # bytes asked for at once over SFTP (see _sftp_blocks)


@dataclass
class TransferStats:
    method: str
    bytes_received: int = 0  # bytes that crossed the wire (rsync --stats "Total bytes received"; SFTP: payload)
    literal_bytes: int = 0  # file data sent as-is (rsync: not matched against a local basis)
    matched_bytes: int = 0  # file data rsync reconstructed from a local (partial) basis
    files: list[str] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)  # computed while transferring (SFTP; rsync: as it lands)
    compression: str | None = None


@dataclass
class _Followed:
    """One temporary file being hashed while rsync writes it."""

    fd: int
    hasher: Any
    done: int = 0


class LandingHasher:
    """sha256 of the files rsync is writing into `dest`, computed while they arrive (a thread).

    rsync's receiver writes each file from the first byte to the last into a temporary file in the same
    folder (no --inplace, no --sparse here) and renames it when complete, so following that file and
    hashing what was appended gives the digest of the final file without reading it a second time.
    `digests()` (after rsync exited) keeps a digest only where the final file is the inode that was
    followed and its size is what was hashed; the rest is left to the caller, who hashes it as before.
    """

    def __init__(
        self,
        dest: Path,
        files: list[RemoteFile],
        *,
        poll_s: float = 0.003,
        chunk: int = 4 << 20,
        min_size: int = 1 << 20,
    ) -> None:
        self.dest = dest
        self.poll_s = poll_s
        self.chunk = chunk
        self._sizes = {f.rel: f.size for f in files}
        # small files land faster than a poll; reading them again afterwards costs nothing
        self._pending = {f.rel for f in files if f.size >= min_size}
        self._followed: dict[str, _Followed] = {}
        self._stale = self._candidates_now()  # temporaries of a killed earlier run are not this transfer's
        self._stop = threading.Event()
        self._thread = context_thread(self._run, name="landing-sha256")

    def __enter__(self) -> LandingHasher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        for f in self._followed.values():
            os.close(f.fd)
        self._followed.clear()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _temporaries(self, rels: set[str]) -> list[tuple[str, Path]]:
        """(file, path) of the rsync temporaries `.<name>.XXXXXX` now present for `rels`: one listing per
        folder and a name lookup per entry, so many files cost what one does."""
        by_folder: dict[Path, dict[str, str]] = {}
        for rel in rels:
            path = self.dest / rel
            by_folder.setdefault(path.parent, {})[path.name] = rel
        out = []
        for folder, names in by_folder.items():
            for entry in _scandir(folder):
                n = entry.name
                if len(n) > 8 and n[0] == "." and n[-7] == "." and _SUFFIX.fullmatch(n[-6:]) and n[1:-7] in names:
                    out.append((names[n[1:-7]], folder / n))
        return out

    def _candidates_now(self) -> set[tuple[int, int]]:
        out: set[tuple[int, int]] = set()
        for _rel, path in self._temporaries(self._pending):
            with contextlib.suppress(OSError):
                st = path.stat(follow_symlinks=False)
                out.add((st.st_dev, st.st_ino))
        return out

    def _find(self) -> None:
        """Open the temporary file of every pending file that rsync has started."""
        for rel, path in self._temporaries(self._pending - self._followed.keys()):
            if rel in self._followed:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:  # renamed or removed in between: hashed afterwards
                continue
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in self._stale or not stat.S_ISREG(st.st_mode):
                os.close(fd)
                continue
            self._followed[rel] = _Followed(fd=fd, hasher=hashlib.sha256())

    def _drain(self, f: _Followed, limit: int) -> bool:
        """Hash what was appended since the last call; True when something was read."""
        got = False
        while f.done < limit:
            data = os.pread(f.fd, min(self.chunk, limit - f.done), f.done)
            if not data:
                break
            f.hasher.update(data)
            f.done += len(data)
            got = True
        return got

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._pending - self._followed.keys():
                self._find()
            busy = False
            for rel, f in self._followed.items():
                busy |= self._drain(f, self._sizes[rel])
            if not busy:
                self._stop.wait(self.poll_s)
        for rel, f in self._followed.items():  # rsync has exited: what is there now is all there is
            self._drain(f, self._sizes[rel])

    def digests(self) -> dict[str, str]:
        """Digests of the final files that are exactly what was followed and hashed (call after stop())."""
        out: dict[str, str] = {}
        for rel, f in self._followed.items():
            try:
                final = os.stat(self.dest / rel, follow_symlinks=False)
            except OSError:
                continue
            held = os.fstat(f.fd)
            same = (final.st_dev, final.st_ino) == (held.st_dev, held.st_ino)
            if same and f.done == final.st_size == self._sizes[rel]:
                out[rel] = f.hasher.hexdigest()
        return out


def _scandir(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError:
        return []


def local_rsync_info(binary: str = "rsync") -> dict | None:
    path = shutil.which(binary)
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"path": path, **parse_rsync_version(out)}


def rsync_pull(
    session: RemoteSession,
    run_dir: str,
    files: list[RemoteFile],
    dest: Path,
    *,
    local: dict,
    remote: dict,
    remote_rsync: str = "rsync",
    bwlimit_kbps: int | None = None,
    compress: bool = False,
    io_timeout: int = 120,
    progress: Progress | None = None,
    on_bytes: BytesHook | None = None,
) -> TransferStats:
    """Pull `files` (relative to `run_dir`) into `dest` with rsync over ssh; partial files are kept."""
    tmp = session.private_dir()
    listing = tmp / "files-from"
    listing.write_bytes(b"\0".join(f.rel.encode() for f in files) + b"\0")
    for f in files:
        local_target(dest, f.rel)  # refuses names that would land outside dest; drops local symlinks
    ssh = session.openssh_command(io_timeout)
    argv = [
        local["path"], "--from0", f"--files-from={listing}", "--times", "--copy-links", "--ignore-times",
        f"--partial-dir={RSYNC_PARTIAL}", "--delay-updates", "--no-inc-recursive", "--no-h",
        "--info=progress2", "--stats", f"--timeout={io_timeout}", "--rsh", _rsh_string(ssh),
    ]  # fmt: skip
    if remote_rsync != "rsync":
        argv.append(f"--rsync-path={remote_rsync}")
    if bwlimit_kbps:
        argv.append(f"--bwlimit={bwlimit_kbps}")
    compression = None
    if compress:
        both = set(local.get("compress", [])) & set(remote.get("compress", []))
        compression = "zstd" if "zstd" in both else "zlib"
        argv += ["--compress", f"--compress-choice={compression}"]
    argv += [f"{session.target.host}:{run_dir.rstrip('/')}/", f"{dest}/"]
    dest.mkdir(parents=True, exist_ok=True)
    log.info(
        "rsync %d file(s) from %s:%s%s",
        len(files),
        session.target.label,
        run_dir,
        f" (compression {compression})" if compression else "",
    )
    env = {**os.environ, "LC_ALL": "C"}
    with LandingHasher(dest, files) as landing:
        rc, stats_text, stderr = _run_rsync(argv, env, progress, on_bytes)
        landing.stop()
        digests = landing.digests() if rc == 0 else {}
    text = stats_text.decode("utf-8", "replace")
    stats = TransferStats(
        method="rsync",
        bytes_received=_stat(text, "Total bytes received"),
        literal_bytes=_stat(text, "Literal data"),
        matched_bytes=_stat(text, "Matched data"),
        files=[f.rel for f in files],
        digests=digests,
        compression=compression,
    )
    if rc != 0:
        msg = f"rsync from {session.target.label} exited with {rc}: {stderr[-600:] or 'no message'}"
        if rc in _RSYNC_TRANSIENT:
            raise TransientError(msg, hint="the partial data is kept; a retry resumes it")
        raise PermanentError(msg, hint="check source.path, the free space here and the rsync versions")
    log.debug("hashed %d of %d file(s) while they landed", len(digests), len(files))
    return stats


def _run_rsync(
    argv: list[str], env: dict[str, str], progress: Progress | None, on_bytes: BytesHook | None
) -> tuple[int, bytearray, str]:
    """Run rsync, feeding its --info=progress2 lines to the progress bar; (exit code, stats lines, stderr)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    err_chunks: list[bytes] = []
    err_thread = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    err_thread.start()
    stats_text = bytearray()
    buf = b""
    try:
        while True:
            chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
            if not chunk:
                break
            buf += chunk
            *lines, buf = re.split(rb"[\r\n]", buf)
            for line in lines:
                m = _PROGRESS2.match(line)
                if m:
                    done = int(m.group(1))
                    if progress is not None:
                        progress.update_to(done)
                    if on_bytes is not None:
                        on_bytes(done)
                elif line.strip():
                    stats_text += line + b"\n"
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    err_thread.join(timeout=10)
    return rc, stats_text, b"".join(err_chunks).decode("utf-8", "replace").strip()


def _rsh_string(argv: list[str]) -> str:
    """rsync splits --rsh on spaces and honours quotes (not backslashes): quote what needs it."""
    out = []
    for a in argv:
        if not a or any(c in a for c in " \t'\""):
            if "'" in a:
                raise PermanentError(
                    f"cannot pass {a!r} to rsync's ssh command (it holds a quote)", hint="use a key path without quotes"
                )
            a = f"'{a}'"
        out.append(a)
    return " ".join(out)


def _stat(text: str, label: str) -> int:
    m = re.search(rf"{label}:\s*([\d,]+)", text)
    return int(m.group(1).replace(",", "")) if m else 0


def sftp_pull(
    session: RemoteSession,
    run_dir: str,
    files: list[RemoteFile],
    dest: Path,
    *,
    progress: Progress | None = None,
    on_bytes: BytesHook | None = None,
    chunk: int = 1 << 20,
) -> TransferStats:
    """Pull `files` with SFTP, resuming each from the size of its partial file; hashes while writing."""
    stats = TransferStats(method="sftp")
    done_total = 0
    for f in files:
        final = local_target(dest, f.rel)
        part = dest / SFTP_PARTIAL / f.rel
        part.parent.mkdir(parents=True, exist_ok=True)
        offset = part.stat().st_size if part.is_file() else 0
        h = hashlib.sha256()
        if offset > f.size:
            part.unlink()
            offset = 0
        elif offset:
            with open(part, "rb") as fh:
                for block in iter(lambda: fh.read(chunk), b""):
                    h.update(block)
            log.info("resuming %s at byte %d of %d over SFTP", f.rel, offset, f.size)
        done_total += offset
        try:
            with session.sftp.open(f"{run_dir}/{f.rel}", "rb") as rf, open(part, "ab") as lf:
                for data in _sftp_blocks(rf, offset, f.size, chunk):
                    lf.write(data)
                    h.update(data)
                    stats.bytes_received += len(data)
                    done_total += len(data)
                    if progress is not None:
                        progress.update_to(done_total)
                    if on_bytes is not None:
                        on_bytes(done_total)
                lf.flush()
                os.fsync(lf.fileno())
        except FileNotFoundError:
            raise PermanentError(
                f"{run_dir}/{f.rel} vanished from {session.target.host} during the download",
                hint="is training still writing to that folder?",
            ) from None
        except (OSError, EOFError) as exc:
            raise TransientError(
                f"SFTP transfer of {f.rel} from {session.target.label} broke off: {exc}",
                hint="the partial file is kept; a retry resumes it",
            ) from None
        os.utime(part, (f.mtime, f.mtime))
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)
        stats.files.append(f.rel)
        stats.digests[f.rel] = h.hexdigest()
    return stats


def _sftp_blocks(rf: Any, start: int, size: int, chunk: int) -> Iterator[bytes]:
    """The bytes of `rf` from `start` to `size`, in blocks of `chunk`, asked for a window at a time.

    Why windows (`readv`) and not one `prefetch()` of the whole file: paramiko marks a prefetch done whenever
    its answers catch up with its requests, even while its thread is still sending them; a read that then finds
    its block not yet asked for turns prefetching off, and the rest of the file goes one synchronous 32 KB
    request at a time (paramiko #2418; measured here: 1 in ~10 loopback pulls of 128 MB took 31 s instead of
    2.5 s). A window bounds that to its own remainder, and the next window prefetches again."""
    pos = start
    while pos < size:
        end = min(size, pos + _SFTP_WINDOW)
        blocks = [(o, min(chunk, end - o)) for o in range(pos, end, chunk)]
        for data in rf.readv(blocks):
            if not data:
                return
            yield data
        pos = end


def clean_partials(dest: Path) -> None:
    for name in (RSYNC_PARTIAL, SFTP_PARTIAL):
        shutil.rmtree(dest / name, ignore_errors=True)
    for p in dest.rglob(RSYNC_PARTIAL):
        shutil.rmtree(p, ignore_errors=True)
