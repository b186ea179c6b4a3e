"""Artifacts: the small, typed records that stages hand each other.

An artifact names a file or a folder on disk with its content digest, its size and its provenance (the
stage that made it, the digests of its inputs, a digest of the settings, the tool versions). Stages take
artifacts and return artifacts; the flow writes them into the run's manifest.json. A record is small and
picklable so Prefect can persist it as a cached task result.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib.metadata
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tasks.core.hashing import digest_of, iter_files, sha256_file, stat_key
from tasks.core.vocab import ArtifactKind


class FileEntry(BaseModel):
    """One regular file inside an artifact (for a single-file artifact, the file itself)."""

    path: str = Field(description="path relative to the artifact's folder; the file name for a file artifact")
    sha256: str
    size: int
    mtime_ns: int = Field(0, description="modification time when hashed: an unchanged stat skips re-hashing")


class Artifact(BaseModel):
    """A file or folder a stage produced, traceable to its inputs by hash."""

    name: str = Field(description="unique in the manifest, e.g. 'adapter', 'merged', 'gguf:Q4_K_M'")
    kind: ArtifactKind = Field(description="what it is: adapter, merged, gguf, report, publish, ... (ArtifactKind)")
    path: str = Field(description="absolute path on this machine")
    is_dir: bool = False
    sha256: str = Field(description="the file's sha256, or for a folder the sha256 of its sorted (path, sha256) list")
    size: int
    files: list[FileEntry] = Field(default_factory=list)
    stage: str
    inputs: dict[str, str] = Field(default_factory=dict, description="input artifact name -> its sha256")
    settings_digest: str = ""
    tools: dict[str, str] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    @property
    def local_path(self) -> Path:
        return Path(self.path)

    @classmethod
    def from_path(
        cls,
        path: Path | str,
        *,
        name: str,
        kind: ArtifactKind,
        stage: str,
        inputs: Iterable[Artifact] | dict[str, str] = (),
        settings: Any = None,
        tools: Iterable[str] = (),
        meta: dict[str, Any] | None = None,
        known: dict[str, str] | None = None,
    ) -> Artifact:
        """Hash `path` (a file or a folder) and build its record.

        `known` maps relative paths to digests already computed (e.g. verified during a download), so
        big files are not read twice.
        """
        p = Path(path).resolve()
        if not p.exists():
            raise FileNotFoundError(f"artifact {name!r}: {p} does not exist")
        known = known or {}
        if p.is_dir():
            entries = []
            for rel in iter_files(p):
                f = p / rel
                size, mtime = stat_key(f)
                entries.append(
                    FileEntry(
                        path=rel.as_posix(),
                        sha256=known.get(rel.as_posix()) or sha256_file(f),
                        size=size,
                        mtime_ns=mtime,
                    )
                )
            digest = folder_digest(entries)
            size = sum(e.size for e in entries)
        else:
            size, mtime = stat_key(p)
            digest = known.get(p.name) or sha256_file(p)
            entries = [FileEntry(path=p.name, sha256=digest, size=size, mtime_ns=mtime)]
        input_map = dict(inputs) if isinstance(inputs, dict) else {a.name: a.sha256 for a in inputs}
        return cls(
            name=name,
            kind=kind,
            path=str(p),
            is_dir=p.is_dir(),
            sha256=digest,
            size=size,
            files=entries,
            stage=stage,
            inputs=input_map,
            settings_digest=digest_of(settings) if settings is not None else "",
            tools=tool_versions(*tools),
            meta=meta or {},
        )

    def problems(self, full: bool = False) -> list[str]:
        """What is wrong with the files on disk compared to this record (empty: all good).

        A file whose size and mtime are unchanged is trusted without re-reading it, unless `full`; any
        other file is re-hashed and compared.
        """
        base = Path(self.path)
        out: list[str] = []
        if not base.exists():
            return [f"{self.path} is missing"]
        for e in self.files:
            f = base / e.path if self.is_dir else base
            if not f.is_file():
                out.append(f"{f} is missing")
                continue
            size, mtime = stat_key(f)
            if size != e.size:
                out.append(f"{f} has {size} bytes, expected {e.size}")
                continue
            if full or mtime != e.mtime_ns:
                if sha256_file(f) != e.sha256:
                    out.append(f"{f} content changed (sha256 differs)")
        return out

    def is_intact(self, full: bool = False) -> bool:
        return not self.problems(full=full)


def folder_digest(entries: Iterable[FileEntry]) -> str:
    return digest_of([[e.path, e.sha256] for e in sorted(entries, key=lambda e: e.path)])


@functools.cache
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def tool_versions(*dists: str) -> dict[str, str]:
    """Versions of the named distributions (always loraship and python), read without importing them."""
    out = {"python": platform.python_version()}
    for d in ("loraship", *dists):
        v = _version(d)
        if v:
            out[d] = v
    return out
