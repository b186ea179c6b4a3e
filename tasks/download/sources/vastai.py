"""`source.kind: vastai`: a vast.ai instance id, resolved through vast.ai's API, then pulled as `ssh`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.download.remote import download_remote
from tasks.download.sources.ssh import SshSource

if TYPE_CHECKING:
    from tasks.core.artifacts import Artifact
    from tasks.download.settings import DownloadSettings


class VastaiSource(SshSource):
    name = "vastai"
    description = "a vast.ai instance (GET /instances/{id}/ gives its SSH address), then as ssh"

    def check(self, settings: DownloadSettings) -> list[str]:
        return [] if settings.instance_id is not None else [f"kind: {self.name} needs source.instance_id"]

    def fetch(
        self, settings: DownloadSettings, dest: Path, *, on_bytes: Callable[[int], None] | None = None
    ) -> Artifact:
        return download_remote(settings, dest, on_bytes=on_bytes)  # resolve_target asks vast.ai first
