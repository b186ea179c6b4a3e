"""The contract of a download source: where a finished training run comes from (`source.kind`).

A source is small: its `name` (the `source.kind` value), a one-line `description`, `check(settings)`
(what is missing or contradictory in the `source:` section for this kind: config validation calls it,
so a mistake fails when the config is loaded), `unavailable()` (why it cannot run on this machine at all,
or None), `available(settings)` (can it run with these settings now, and if not, why: the stage says so
before trying), and `fetch(settings, dest, on_bytes)`, which brings
the run into `dest`, verified, and returns the `adapter` artifact. Adding a source is one module in this
package and its instance in `SOURCES` (tasks/download/sources/__init__.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from tasks.core.artifacts import Artifact
    from tasks.download.settings import DownloadSettings


class Source(ABC):
    """One way to reach a training run's output."""

    name: ClassVar[str]
    description: ClassVar[str]

    @abstractmethod
    def check(self, settings: DownloadSettings) -> list[str]:
        """Problems with `settings` for this source (empty: fine); each names the field to set."""

    def unavailable(self) -> str | None:
        """Why this source cannot run on this machine whatever the settings (a missing package), or None."""
        return None

    def available(self, settings: DownloadSettings) -> tuple[bool, str]:
        """(True, how it will run with these settings) or (False, why not and what to install)."""
        reason = self.unavailable()
        return (False, reason) if reason else (True, "")

    @abstractmethod
    def fetch(
        self, settings: DownloadSettings, dest: Path, *, on_bytes: Callable[[int], None] | None = None
    ) -> Artifact:
        """Bring the run into `dest` (every file verified by sha256); return the `adapter` artifact."""
