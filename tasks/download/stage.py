"""Stage 1, download: bring the adapter and training metadata into the run folder.

Sources: a local folder (training ran here; the demo uses it), an SSH host (from the settings or a
saved TrainingHost block), or a vast.ai instance id (resolved to its SSH address through vast.ai's API).
Every file is verified by sha256 against the source's digest; files that already match are not copied
again, so a re-run after a finished download transfers nothing. The task is deliberately not cached
by Prefect: the remote can change between runs, and the digest comparison is the cache.

Modules: download_ssh.py (paramiko: host keys, discovery, remote sha256), download_transfer.py (rsync
and the SFTP fallback), download_vastai.py (instance lookup), download_remote.py (the remote pull).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_path, atomic_write_json
from tasks.core.errors import PermanentError
from tasks.core.hashing import iter_files, sha256_file
from tasks.core.progress import Progress
from tasks.core.stage import stage_task
from tasks.download.metadata import metadata_files, remove_extraneous, training_summary
from tasks.download.remote import download_remote
from tasks.download.settings import STAGE, BytesHook, DownloadSettings

log = logging.getLogger("loraship.download")


def download(settings: DownloadSettings, dest: Path, *, on_bytes: BytesHook | None = None) -> Artifact:
    """Bring the run into `dest` (verified) and return it as the 'adapter' artifact.

    `on_bytes` is called with the bytes transferred so far (tests and benchmarks use it to interrupt).
    """
    if settings.kind == "local":
        return download_local(settings, dest)
    return download_remote(settings, dest, on_bytes=on_bytes)


def download_local(settings: DownloadSettings, dest: Path) -> Artifact:
    src = Path(settings.path).expanduser().resolve()
    if not src.is_dir():
        raise PermanentError(
            f"source.path {src} is not a folder",
            hint="point source.path at the training output folder (with adapter_config.json)",
        )
    files = [
        f
        for f in iter_files(src)
        if any(f.match(p) for p in settings.include) and not any(f.match(p) for p in settings.exclude)
    ]
    if not files:
        raise PermanentError(
            f"source.path {src} holds no files matching {settings.include}", hint="check source.path and source.include"
        )
    if not any(f.name == "adapter_config.json" for f in files):
        raise PermanentError(
            f"no adapter_config.json under {src}",
            hint="point source.path at the adapter folder (the one save_pretrained wrote)",
        )
    started = time.monotonic()
    total = sum((src / f).stat().st_size for f in files)
    dest.mkdir(parents=True, exist_ok=True)
    known: dict[str, str] = {}
    copied = 0
    fetched = 0
    with Progress(f"download {src.name}", total) as progress:
        for rel in files:
            s, d = src / rel, dest / rel
            digest = sha256_file(s)
            if not (d.is_file() and d.stat().st_size == s.stat().st_size and sha256_file(d) == digest):
                with atomic_path(d) as tmp:
                    shutil.copyfile(s, tmp)
                if sha256_file(d) != digest:
                    raise PermanentError(f"{d} does not match {s} after copying", hint="check the disk")
                copied += s.stat().st_size
                fetched += 1
            known[rel.as_posix()] = digest
            progress.advance(s.stat().st_size)
    removed = remove_extraneous(dest, set(known))
    seconds = time.monotonic() - started
    files_rec = {k: {"sha256": v, "size": (src / k).stat().st_size} for k, v in known.items()}
    training = training_summary(dest)
    record = {
        "source": "local",
        "path": str(src),
        "files": files_rec,
        "bytes_total": total,
        "bytes_copied": copied,
        "removed": removed,
        "seconds": round(seconds, 3),
        "training": training,
    }
    atomic_write_json(dest.parent / "download.json", record)
    return Artifact.from_path(
        dest,
        name="adapter",
        kind="adapter",
        stage=STAGE,
        settings=settings,
        known=known,
        meta={
            "source": str(src),
            "method": "copy" if copied else "none",
            "metadata_files": metadata_files(dest),
            "bytes_copied": copied,
            "files_fetched": fetched,
            "training": training,
        },
    )


@stage_task(STAGE, cache=False)
def download_task(settings: DownloadSettings, dest: Path) -> Artifact:
    """Not cached: the remote may change; unchanged files are recognised by digest and not re-sent."""
    return download(settings, dest)
