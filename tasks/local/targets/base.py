"""The contract of a local target: somewhere on this machine a desktop app finds the GGUFs.

A target is one small class: `name` (its key in `deployment.targets` and the record `local:<name>`),
`description` / `describe()` (one line for the settings help and the README), `availability(settings)` (is
the app's CLI here, and what happens when it is not: the target still deploys what it can and the record
says what was skipped), and `deploy(...)` (do it, or in a dry run write only the plan into the run folder,
and return the record artifact). Adding a target is one module in this package plus its instance in the
table in tasks/local/targets/__init__.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tasks.core.artifacts import Artifact
from tasks.core.vocab import ArtifactKind, Stage
from tasks.gguf import quant_types

if TYPE_CHECKING:
    from tasks.local.settings import LocalDeploySettings

STAGE = Stage.LOCAL_DEPLOY


@dataclass(frozen=True)
class Availability:
    """Whether the target's app/CLI is found (`ready`); `reason` says what deploy does either way."""

    ready: bool
    reason: str


class LocalTarget(ABC):
    """One local app. Subclass, set the class attributes, implement `availability` and `deploy`."""

    name: ClassVar[str]
    title: ClassVar[str]
    description: ClassVar[str]  # one line: what this target does with the GGUFs

    def describe(self) -> str:
        """One line for the settings help, the README and logs."""
        return f"{self.title}: {self.description}"

    def unavailable(self) -> str | None:
        """Why this target cannot deploy on this machine at all, or None. Today's targets always can (they
        write files; a missing app CLI is a mode that `availability` describes), so the default is None."""
        return None

    @abstractmethod
    def availability(self, settings: LocalDeploySettings) -> Availability:
        """Is the app's CLI here? Never raises: a missing app is a reason, not an error."""

    @abstractmethod
    def deploy(
        self, ggufs: list[Artifact], settings: LocalDeploySettings, model: str, out_dir: Path, dry_run: bool = False
    ) -> Artifact:
        """Deploy (dry run: write the plan under `out_dir` only); return the `local:<name>` record artifact."""

    @property
    def record_name(self) -> str:
        return f"local:{self.name}"

    def record(
        self, path: Path, ggufs: list[Artifact], settings: LocalDeploySettings, meta: dict[str, Any]
    ) -> Artifact:
        """The `local:<name>` record artifact every target returns: its file or folder `path`, made from `ggufs`."""
        return Artifact.from_path(
            path,
            name=self.record_name,
            kind=ArtifactKind.PUBLISH,
            stage=STAGE,
            inputs=ggufs,
            settings=settings,
            meta=meta,
        )


def pick(ggufs: list[Artifact], quant: str, log) -> Artifact:
    """The GGUF of `quant`, else the last quantized one (with a warning), else the last one."""
    by_quant = {a.meta.get("quant"): a for a in ggufs}
    if quant in by_quant:
        return by_quant[quant]
    quantized = [a for a in ggufs if not quant_types.is_float(str(a.meta.get("quant", "")))]
    chosen = (quantized or ggufs)[-1]
    log.warning("quant %s was not made in this run; using %s", quant, chosen.meta.get("quant"))
    return chosen
