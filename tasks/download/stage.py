"""Stage 1, download: bring the adapter and training metadata into the run folder.

Where from is `source.kind`, one of the registered sources (tasks/download/sources/: a local folder,
an SSH host from the settings or a saved TrainingHost block, a vast.ai instance id resolved to its SSH
address). Every file is verified by sha256 against the source's digest; files that already match are not
copied again, so a re-run after a finished download transfers nothing. The task is deliberately not
cached by Prefect: the remote can change between runs, and the digest comparison is the cache.

Pickles nothing downstream reads (HF Trainer's training_args.bin, which holds the hub token) are never
fetched (settings.NEVER_FETCH); the card and loraship.json read the JSON metadata only.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tasks.core.artifacts import Artifact
from tasks.core.errors import PermanentError
from tasks.core.stage import stage_task
from tasks.download.metadata import training_summary
from tasks.download.settings import DownloadSettings
from tasks.download.sources import SOURCES
from tasks.download.sources.local import download_local
from tasks.download.vocab import STAGE, BytesHook

log = logging.getLogger("loraship.download")

__all__ = ["DownloadSettings", "download", "download_local", "download_task", "training_summary"]


def download(settings: DownloadSettings, dest: Path, *, on_bytes: BytesHook | None = None) -> Artifact:
    """Bring the run into `dest` (verified) and return it as the 'adapter' artifact.

    `on_bytes` is called with the bytes transferred so far (tests and benchmarks use it to interrupt).
    """
    source = SOURCES.lookup(settings.kind)
    ok, how = source.available(settings)
    if not ok:
        raise PermanentError(f"source.kind {settings.kind} cannot run here: {how}")
    if how:
        log.debug("download from %s: %s", settings.kind, how)
    return source.fetch(settings, dest, on_bytes=on_bytes)


@stage_task(STAGE, cache=False)
def download_task(settings: DownloadSettings, dest: Path) -> Artifact:
    """Not cached: the remote may change; unchanged files are recognised by digest and not re-sent."""
    return download(settings, dest)
