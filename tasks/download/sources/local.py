"""`source.kind: local`: a training run's folder on this machine (the demo uses it), copied verified.

The run folder is `source.path` itself when it holds adapter_config.json, else the newest direct child
matching `final_glob` that holds one, else the `checkpoint_glob` child with the highest step: the same
rule as on a remote box, and no recursive search of arbitrary trees (an event or a typo must not make
the pipeline walk a home folder). Inside the run folder, symlinks that point outside it are refused
(copying through one would publish whatever it points at), links to folders are skipped, and only regular
files are copied. Files already here with the same sha256 are not copied again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.artifacts import Artifact
from tasks.core.atomic import TMP_MARKER, atomic_path, atomic_write_json
from tasks.core.errors import PermanentError
from tasks.core.hashing import sha256_file
from tasks.core.progress import Progress
from tasks.core.vocab import ArtifactKind
from tasks.download.metadata import metadata_files, remove_extraneous, training_summary
from tasks.download.sources.base import Source
from tasks.download.vocab import ADAPTER_MARKER, METADATA_FILES, STAGE, wanted

if TYPE_CHECKING:
    from tasks.download.settings import DownloadSettings

log = logging.getLogger("loraship.download")


class LocalSource(Source):
    name = "local"
    description = "a folder on this machine (training ran here; the demo)"

    def check(self, settings: DownloadSettings) -> list[str]:
        if not settings.path:
            return ["source.path is required for kind: local (the folder holding adapter_config.json)"]
        return []

    def fetch(
        self, settings: DownloadSettings, dest: Path, *, on_bytes: Callable[[int], None] | None = None
    ) -> Artifact:
        return download_local(settings, dest)


def _step(name: str) -> int:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else -1


def find_local_run(src: Path, final_glob: str, checkpoint_glob: str) -> tuple[Path, str]:
    """(run folder, how it was chosen): `src`, or one of its direct children; never deeper."""
    if (src / ADAPTER_MARKER).is_file():
        return src, "path"
    children = [
        c for c in sorted(src.iterdir()) if c.is_dir() and not c.is_symlink() and (c / ADAPTER_MARKER).is_file()
    ]
    finals = [c for c in children if final_glob and fnmatch(c.name, final_glob)]
    if finals:
        return max(finals, key=lambda c: (c.stat().st_mtime, c.name)), "final"
    checkpoints = [c for c in children if checkpoint_glob and fnmatch(c.name, checkpoint_glob)]
    if checkpoints:
        return max(checkpoints, key=lambda c: (_step(c.name), c.stat().st_mtime, c.name)), "checkpoint"
    raise PermanentError(
        (
            f"no {ADAPTER_MARKER} in {src}, nor in a child folder matching {final_glob!r} or {checkpoint_glob!r} "
            "(sub-folders further down are not searched)"
        ),
        hint="point source.path at the folder the adapter was saved to (save_pretrained), or its parent",
    )


def list_local_files(run_dir: Path, settings: DownloadSettings) -> list[str]:
    """Relative paths of the regular files to copy; a symlink leaving `run_dir` is refused."""
    root = run_dir.resolve()
    out: list[str] = []
    for dirpath, dirs, files in os.walk(run_dir):
        here = Path(dirpath)
        for d in list(dirs):
            p = here / d
            if d.startswith(TMP_MARKER):
                dirs.remove(d)
            elif p.is_symlink():
                _inside(p, root, run_dir)
                log.warning("skipping %s: a symlink to a folder (its files are copied from their real place)", p)
                dirs.remove(d)
        for name in files:
            p = here / name
            rel = p.relative_to(run_dir).as_posix()
            if name.startswith(TMP_MARKER) or not wanted(rel, settings.include, settings.exclude):
                continue
            if p.is_symlink():
                _inside(p, root, run_dir)
            st = p.stat()  # follows a link that stays inside
            if stat.S_ISREG(st.st_mode):
                out.append(rel)
    return sorted(out)


def _inside(link: Path, root: Path, run_dir: Path) -> None:
    target = link.resolve()
    if target != root and not target.is_relative_to(root):
        raise PermanentError(
            f"refusing {link.relative_to(run_dir)} in {run_dir}: a symlink pointing outside the run folder ({target})",
            hint="copy the file into the run folder instead of linking it",
        )


def _beside(src: Path, run_dir: Path) -> dict[str, Any]:
    """Training JSON in the output root when the run folder is one of its checkpoints."""
    if src == run_dir:
        return {}
    out = {}
    for name in METADATA_FILES:
        p = src / name
        if p.is_file() and not p.is_symlink() and p.stat().st_size < 4 << 20:
            try:
                out[name] = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
    return out


def download_local(settings: DownloadSettings, dest: Path) -> Artifact:
    src = Path(settings.path).expanduser().resolve()
    if not src.is_dir():
        raise PermanentError(
            f"source.path {src} is not a folder",
            hint="point source.path at the training output folder (with adapter_config.json)",
        )
    run_dir, how = find_local_run(src, settings.final_glob, settings.checkpoint_glob)
    files = list_local_files(run_dir, settings)
    if not files:
        raise PermanentError(
            f"{run_dir} holds no files matching {settings.include}", hint="check source.path and source.include"
        )
    if ADAPTER_MARKER not in files:
        raise PermanentError(
            f"no adapter_config.json among the selected files of {run_dir}",
            hint="check source.include / source.exclude",
        )
    started = time.monotonic()
    total = sum((run_dir / f).stat().st_size for f in files)
    dest.mkdir(parents=True, exist_ok=True)
    known: dict[str, str] = {}
    copied = fetched = 0
    with Progress(f"download {run_dir.name}", total) as progress:
        for rel in files:
            s, d = run_dir / rel, dest / rel
            digest = sha256_file(s)
            if not (d.is_file() and d.stat().st_size == s.stat().st_size and sha256_file(d) == digest):
                with atomic_path(d) as tmp:
                    shutil.copyfile(s, tmp)
                if sha256_file(d) != digest:
                    raise PermanentError(f"{d} does not match {s} after copying", hint="check the disk")
                copied += s.stat().st_size
                fetched += 1
            known[rel] = digest
            progress.advance(s.stat().st_size)
    removed = remove_extraneous(dest, set(known))
    training = training_summary(dest, _beside(src, run_dir))
    record = {
        "source": "local",
        "path": str(run_dir),
        "selected": how,
        "files": {k: {"sha256": v, "size": (run_dir / k).stat().st_size} for k, v in known.items()},
        "bytes_total": total,
        "bytes_copied": copied,
        "removed": removed,
        "seconds": round(time.monotonic() - started, 3),
        "training": training,
    }
    atomic_write_json(dest.parent / "download.json", record)
    return Artifact.from_path(
        dest,
        name="adapter",
        kind=ArtifactKind.ADAPTER,
        stage=STAGE,
        settings=settings,
        known=known,
        meta={
            "source": str(run_dir),
            "selected": how,
            "method": "copy" if copied else "none",
            "metadata_files": metadata_files(dest),
            "bytes_copied": copied,
            "files_fetched": fetched,
            "training": training,
        },
    )
