"""Stage 1, download: bring the adapter and training metadata into the run folder.

Sources: a local folder (training ran here; the demo uses it), an SSH host, or a vast.ai instance.
Every file is verified by sha256; files that already match are not copied again.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_path, atomic_write_json
from tasks.core.errors import PermanentError
from tasks.core.hashing import iter_files, sha256_file
from tasks.core.progress import Progress
from tasks.core.settings import StrictModel
from tasks.core.stage import stage_task

STAGE = "download"
METADATA_FILES = ("adapter_config.json", "trainer_state.json", "training_args.json", "all_results.json", "train_results.json", "results.json")


class DownloadSettings(StrictModel):
    """Where the finished training run is. `kind: local` reads a folder on this machine."""

    kind: Literal["local", "ssh", "vastai"] = "local"
    path: str = Field("", description="the run's output folder (local path, or the path on the remote host)")
    include: list[str] = Field(default_factory=lambda: ["*"], description="glob patterns of files to fetch")

    @model_validator(mode="after")
    def _needs_path(self) -> "DownloadSettings":
        if self.kind == "local" and not self.path:
            raise ValueError("source.path is required for kind: local (the folder holding adapter_config.json)")
        return self


def download(settings: DownloadSettings, dest: Path) -> Artifact:
    """Copy (verified) the adapter folder into `dest` and return it as the 'adapter' artifact."""
    if settings.kind != "local":
        raise PermanentError(f"source.kind {settings.kind!r} is not available in this build yet", hint="use source.kind: local")
    return download_local(settings, dest)


def download_local(settings: DownloadSettings, dest: Path) -> Artifact:
    src = Path(settings.path).expanduser().resolve()
    if not src.is_dir():
        raise PermanentError(f"source.path {src} is not a folder", hint="point source.path at the training output folder (with adapter_config.json)")
    files = [f for f in iter_files(src) if any(f.match(p) for p in settings.include)]
    if not files:
        raise PermanentError(f"source.path {src} holds no files matching {settings.include}", hint="check source.path and source.include")
    if not any(f.name == "adapter_config.json" for f in files):
        raise PermanentError(f"no adapter_config.json under {src}", hint="point source.path at the adapter folder (the one save_pretrained wrote)")
    started = time.monotonic()
    total = sum((src / f).stat().st_size for f in files)
    dest.mkdir(parents=True, exist_ok=True)
    known: dict[str, str] = {}
    copied = 0
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
            known[rel.as_posix()] = digest
            progress.advance(s.stat().st_size)
    seconds = time.monotonic() - started
    record = {"source": "local", "path": str(src), "files": {k: {"sha256": v, "size": (src / k).stat().st_size} for k, v in known.items()}, "bytes_copied": copied, "seconds": round(seconds, 3)}
    atomic_write_json(dest.parent / "download.json", record)
    metadata = {name: str(dest / name) for name in METADATA_FILES if (dest / name).exists()}
    return Artifact.from_path(dest, name="adapter", kind="adapter", stage=STAGE, settings=settings, known=known, meta={"source": str(src), "metadata_files": metadata, "bytes_copied": copied})


@stage_task(STAGE)
def download_task(settings: DownloadSettings, dest: Path) -> Artifact:
    return download(settings, dest)
