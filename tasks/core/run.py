"""The run folder and its manifest.

Each run lives in runs/<model>/<version>/ (runs_dir is configurable). Its manifest.json lists every
artifact and the outcome of every stage; the model card, the health report and the eval report read the
manifest, not each other. The manifest is rewritten atomically under a file lock, so stages that finish
at the same time (parallel quantize) cannot lose each other's records.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path
from typing import Any

from filelock import FileLock
from pydantic import BaseModel, Field

from tasks.core.artifacts import Artifact, tool_versions
from tasks.core.atomic import atomic_write_json
from tasks.core.scrub import scrub
from tasks.core.vocab import ArtifactKind, StageStatus


class StageRecord(BaseModel):
    status: StageStatus
    seconds: float = 0.0
    message: str = ""
    artifacts: list[str] = Field(default_factory=list)


class Superseded(BaseModel):
    """An artifact that left the run's lineage: never published, linked, served, evaluated or split again."""

    artifact: Artifact
    reason: str
    since: str = Field(default_factory=lambda: _now())


class Manifest(BaseModel):
    schema_version: int = 1
    model: str
    version: str
    created_at: str = Field(default_factory=lambda: _now())
    updated_at: str = Field(default_factory=lambda: _now())
    config_digest: str = ""
    tools: dict[str, str] = Field(default_factory=dict)
    stages: dict[str, StageRecord] = Field(default_factory=dict)
    artifacts: dict[str, Artifact] = Field(default_factory=dict)
    removed: dict[str, str] = Field(
        default_factory=dict, description="artifacts deleted on purpose (cleanup) -> their sha256"
    )
    superseded: dict[str, Superseded] = Field(
        default_factory=dict, description="artifacts that left the lineage (tasks/core/lineage.py), with the reason"
    )

    def of_kind(self, kind: ArtifactKind) -> list[Artifact]:
        return [a for a in self.artifacts.values() if a.kind == kind]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class RunFolder:
    """Paths of one run and safe updates of its manifest."""

    _thread_lock = threading.RLock()

    def __init__(self, root: Path | str, model: str, version: str):
        self.root = Path(root).resolve()
        self.model = model
        self.version = version

    @classmethod
    def for_model(cls, runs_dir: Path | str, model: str, version: str) -> RunFolder:
        return cls(Path(runs_dir) / model / version, model, version)

    # Layout: one place that names every folder, so stages agree on it.
    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapter"

    @property
    def merged_dir(self) -> Path:
        return self.root / "merged"

    @property
    def gguf_dir(self) -> Path:
        return self.root / "gguf"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def publish_dir(self) -> Path:
        return self.root / "publish"

    @property
    def cache_dir(self) -> Path:
        return self.root / ".cache"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def ensure(self) -> RunFolder:
        for d in (self.root, self.reports_dir, self.cache_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def load_manifest(self) -> Manifest:
        if self.manifest_path.exists():
            return Manifest.model_validate_json(self.manifest_path.read_text())
        return Manifest(model=self.model, version=self.version, tools=tool_versions())

    def update_manifest(self, fn) -> Manifest:
        """Apply `fn(manifest)` under a process and thread lock and write the result atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._thread_lock, FileLock(str(self.root / ".manifest.lock")):
            m = self.load_manifest()
            fn(m)
            m.updated_at = _now()
            atomic_write_json(self.manifest_path, json.loads(m.model_dump_json()))
            return m

    def record(
        self, stage: str, status: StageStatus, artifacts: list[Artifact] = (), seconds: float = 0.0, message: str = ""
    ) -> Manifest:
        def apply(m: Manifest) -> None:
            for a in artifacts:
                m.artifacts[a.name] = a
                m.superseded.pop(a.name, None)
                for k, v in a.tools.items():
                    m.tools.setdefault(k, v)
            m.stages[stage] = StageRecord(
                status=status, seconds=round(seconds, 3), message=scrub(message), artifacts=[a.name for a in artifacts]
            )

        return self.update_manifest(apply)

    def supersede(self, reasons: dict[str, str]) -> list[str]:
        """Move the named artifacts from `artifacts` to `superseded`, each with why it left the lineage."""
        moved: list[str] = []

        def apply(m: Manifest) -> None:
            for name, reason in reasons.items():
                a = m.artifacts.pop(name, None)
                if a is not None:
                    m.superseded[name] = Superseded(artifact=a, reason=reason)
                    moved.append(name)

        if reasons:
            self.update_manifest(apply)
        return moved

    def restore(self, artifacts: list[Artifact]) -> None:
        """Carried artifacts that an earlier run had marked superseded and that are current again."""

        def apply(m: Manifest) -> None:
            for a in artifacts:
                if a.name in m.superseded and a.name not in m.artifacts:
                    m.artifacts[a.name] = m.superseded.pop(a.name).artifact

        if artifacts:
            self.update_manifest(apply)

    def prune_missing(self) -> list[str]:
        """Move artifacts whose files were deleted on purpose (pipeline.cleanup) out of `artifacts`, into
        `removed`, so the manifest never lists a path that is not there."""
        gone: list[str] = []

        def apply(m: Manifest) -> None:
            for name, a in list(m.artifacts.items()):
                if not Path(a.path).exists():
                    m.removed[name] = a.sha256
                    del m.artifacts[name]
                    gone.append(name)

        self.update_manifest(apply)
        return gone

    def set_config_digest(self, digest: str) -> None:
        def apply(m: Manifest) -> None:
            m.config_digest = digest

        self.update_manifest(apply)


def manifest_table(m: Manifest) -> list[dict[str, Any]]:
    """Rows for the terminal summary and the Prefect table artifact."""
    rows = []
    for a in m.artifacts.values():
        rows.append(
            {
                "artifact": a.name,
                "stage": a.stage,
                "size_mb": round(a.size / 1e6, 2),
                "sha256": a.sha256[:16],
                "path": a.path,
            }
        )
    return rows
