"""`source.kind: ssh`: a training box reached over SSH (host key checked), pulled by rsync or SFTP."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.download.remote import download_remote
from tasks.download.sources.base import Source

if TYPE_CHECKING:
    from tasks.core.artifacts import Artifact
    from tasks.download.settings import DownloadSettings


class SshSource(Source):
    name = "ssh"
    description = "a training box over SSH (paramiko; rsync over ssh, SFTP when rsync is missing)"

    def check(self, settings: DownloadSettings) -> list[str]:
        if not (settings.host or settings.host_block):
            return [f"kind: {self.name} needs source.host or source.host_block (a saved TrainingHost block)"]
        return []

    def unavailable(self) -> str | None:
        return (
            "paramiko is not installed (pip install paramiko)" if importlib.util.find_spec("paramiko") is None else None
        )

    def available(self, settings: DownloadSettings) -> tuple[bool, str]:
        if reason := self.unavailable():
            return False, reason
        if settings.transfer == "rsync" and not (shutil.which("rsync") and shutil.which("ssh")):
            return False, "source.transfer is rsync but rsync or ssh is not installed here (apt-get install rsync)"
        if not (shutil.which("rsync") and shutil.which("ssh")):
            return True, "no rsync/ssh here: SFTP with resume"
        return True, "rsync over ssh (SFTP if the box has no rsync)"

    def fetch(
        self, settings: DownloadSettings, dest: Path, *, on_bytes: Callable[[int], None] | None = None
    ) -> Artifact:
        return download_remote(settings, dest, on_bytes=on_bytes)
