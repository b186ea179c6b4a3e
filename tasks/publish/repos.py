"""The model repos a run publishes (`hub.repos`), as the Hub's conventions expect them. One table, one contract.

People look for a fine-tune in three shapes, each its own repo with its own card (tasks/publish/card.py):

| `hub.repos` | repo | holds | card (`library_name`, `base_model_relation`) |
| --- | --- | --- | --- |
| `merged` | `<owner>/<model>` | the merged model (what `from_pretrained` loads) | transformers, finetune of the base |
| `gguf` | `<owner>/<model>-GGUF` | the GGUFs (the default) | gguf, quantized from the merged repo if any |
| `adapter` | `<owner>/<model>-LoRA` | the LoRA adapter (what peft loads) | peft, adapter of the base |

Each repo also gets training/*.json (the training configuration and results), README.md (its card, which
links the others) and loraship.json (what was published, with digests; what a later push compares with
to delete files that left the run). hub_push stages each one under publish/hub/<owner>__<name>/, checks
it against the allow-list of its kind (tasks/publish/allowlist.py) and the secret scan, and pushes it in
one commit.

Adding a repo kind is a `HubRepo` subclass here (`name`, `suffix`, `title`, `description`,
`unavailable(job)`, `publishable(job)`, `stage(job, folder)`, `notes(job)`; or an `ArtifactRepo` for one
artifact at the repo root: `artifact`, `allowed`, `absent`, `missing(art)`), its entry in `HUB_REPOS`,
its layout in allowlist.repo_file_allowed and its card branch in card.py (+ templates/model_card.md.j2).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tasks.core.artifacts import Artifact
from tasks.core.registry import Contract, Registry
from tasks.publish.allowlist import (
    adapter_file_allowed,
    merged_file_allowed,
    scrub_json_file,
    training_file_allowed,
)

log = logging.getLogger("loraship.hub_push")


@dataclass(frozen=True)
class RepoJob:
    """What a repo kind publishes from: this run's artifacts, and the base's Hub id for scrubbed configs."""

    ggufs: list[Artifact] = field(default_factory=list)
    splits: list[Artifact] = field(default_factory=list)
    adapter: Artifact | None = None
    merged: Artifact | None = None
    include_adapter: bool = True  # the GGUF repo's adapter/ folder (hub.include_adapter)
    include_merged: bool = False  # the GGUF repo's merged/ folder (hub.include_merged)
    base_hub_id: str = ""  # replaces a local base path in published configs; "" drops it


@dataclass
class Staged:
    known: dict[str, str] = field(default_factory=dict)  # repo path -> sha256 already known (hard-linked files)
    left_out: list[str] = field(default_factory=list)  # files of the artifacts that the allow-list keeps out


def link(src: Path, dst: Path) -> None:
    """Hard-link `src` at `dst` (a symlink or copy across filesystems): staging never copies a GGUF twice."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        try:
            os.symlink(src.resolve(), dst)
        except OSError:
            shutil.copy2(src, dst)


def put(staged: Staged, src: Path, folder: Path, path_in_repo: str, sha256: str | None, job: RepoJob) -> None:
    """Stage one file: a JSON file with local paths in it is rewritten (allowlist.scrub_json_file), anything
    else is linked and its digest is known."""
    if scrub_json_file(src, folder / path_in_repo, job.base_hub_id):
        log.info("%s: local paths replaced in the published copy", path_in_repo)
        return
    link(src, folder / path_in_repo)
    if sha256:
        staged.known[path_in_repo] = sha256


def training_files(adapter: Artifact | None) -> dict[str, str]:
    """The training metadata files published under training/: JSON only."""
    files = (adapter.meta.get("metadata_files") or {}) if adapter is not None else {}
    return {n: p for n, p in files.items() if training_file_allowed(n) and Path(p).is_file()}


def stage_training(staged: Staged, job: RepoJob, folder: Path, skip: tuple[str, ...] = ()) -> None:
    for name, p in sorted(training_files(job.adapter).items()):
        if name not in skip:
            put(staged, Path(p), folder, f"training/{name}", None, job)


def stage_artifact(
    staged: Staged, artifact: Artifact, folder: Path, prefix: str, allowed: Callable[[str], bool], job: RepoJob
) -> None:
    """Every allowed file of a folder artifact under `prefix` ("" for the repo root)."""
    for f in artifact.files:
        if not allowed(f.path):
            staged.left_out.append(f"{prefix}{f.path}")
            continue
        put(staged, Path(artifact.path) / f.path, folder, f"{prefix}{f.path}", f.sha256, job)


def training_note(job: RepoJob, skip: tuple[str, ...] = ()) -> list[dict[str, str]]:
    names = sorted(n for n in training_files(job.adapter) if n not in skip)
    if not names:
        return []
    return [{"path": "training/", "what": "training configuration and results (" + ", ".join(names) + ")"}]


LORASHIP_NOTE = {"path": "loraship.json", "what": "every published file with its sha256 and provenance"}


class HubRepo:
    """One kind of model repo. `suffix` makes its default id (`<owner>/<model><suffix>`); `title` is how the
    other cards link it."""

    name: str
    suffix: str
    title: str
    description: str

    def unavailable(self, job: RepoJob) -> str | None:
        """Why this run cannot publish this repo (what it needs was not made), or None."""
        raise NotImplementedError

    def publishable(self, job: RepoJob) -> list[Artifact]:
        """The artifacts loraship.json describes."""
        raise NotImplementedError

    def stage(self, job: RepoJob, folder: Path) -> Staged:
        """Put every file of the repo except README.md and loraship.json in `folder`."""
        raise NotImplementedError

    def notes(self, job: RepoJob) -> list[dict[str, str]]:
        """The card's 'Other files in this repo' rows."""
        raise NotImplementedError


class GgufRepo(HubRepo):
    name = "gguf"
    suffix = "-GGUF"
    title = "GGUF"
    description = "the GGUFs for llama.cpp, LM Studio and Ollama (plus adapter/ and merged/ when asked)"

    def unavailable(self, job: RepoJob) -> str | None:
        return None if job.ggufs else "no GGUF artifacts in this run"

    def publishable(self, job: RepoJob) -> list[Artifact]:
        return [
            *job.ggufs,
            *([job.adapter] if job.adapter is not None and job.include_adapter else []),
            *([job.merged] if job.merged is not None and job.include_merged else []),
        ]

    def stage(self, job: RepoJob, folder: Path) -> Staged:
        """A GGUF that the quantize stage split into shards (quantization.split_max_size) is published as its
        shard folder `<model>-<QUANT>/` instead of the single file: that is what the split is for (the Hub
        refuses files over 50 GB), and llama.cpp loads the set from its first shard."""
        staged = Staged()
        split_of = {str(a.meta.get("unsplit")): a for a in job.splits}
        for g in job.ggufs:
            split = split_of.get(Path(g.path).name)
            if split is not None:
                shards = Path(split.path)
                for f in split.files:
                    link(shards / f.path, folder / shards.name / f.path)
                    staged.known[f"{shards.name}/{f.path}"] = f.sha256
                continue
            link(Path(g.path), folder / Path(g.path).name)
            staged.known[Path(g.path).name] = g.sha256
        stage_training(staged, job, folder)
        if job.adapter is not None and job.include_adapter:
            stage_artifact(staged, job.adapter, folder, "adapter/", adapter_file_allowed, job)
        if job.merged is not None and job.include_merged:
            stage_artifact(staged, job.merged, folder, "merged/", merged_file_allowed, job)
        return staged

    def notes(self, job: RepoJob) -> list[dict[str, str]]:
        notes = training_note(job)
        if job.adapter is not None and job.include_adapter:
            notes.append({"path": "adapter/", "what": "the LoRA adapter (peft) the GGUFs were merged from"})
        if job.merged is not None and job.include_merged:
            notes.append({"path": "merged/", "what": "the merged model as safetensors (for transformers)"})
        return [*notes, LORASHIP_NOTE]


class ArtifactRepo(HubRepo):
    """A repo that holds one artifact of the run at its root (the merged model, the adapter), plus training/:
    the kinds differ only in which artifact, its allow-list, and what makes it publishable."""

    artifact: str  # the RepoJob field
    allowed: Callable[[str], bool]  # the allow-list of the artifact's files (a staticmethod)
    absent: str  # the reason when the run did not make the artifact
    at_root: tuple[str, ...] = ()  # training files the artifact already holds at the root

    def missing(self, art: Artifact) -> str | None:
        """Why this artifact cannot make the repo (checked after it exists), or None."""
        return None

    def unavailable(self, job: RepoJob) -> str | None:
        art = getattr(job, self.artifact)
        return self.absent if art is None else self.missing(art)

    def publishable(self, job: RepoJob) -> list[Artifact]:
        art = getattr(job, self.artifact)
        return [art] if art is not None else []

    def stage(self, job: RepoJob, folder: Path) -> Staged:
        staged = Staged()
        art = getattr(job, self.artifact)
        assert art is not None  # unavailable() said so
        stage_artifact(staged, art, folder, "", self.allowed, job)
        stage_training(staged, job, folder, skip=self.at_root)
        return staged

    def notes(self, job: RepoJob) -> list[dict[str, str]]:
        return [*training_note(job, skip=self.at_root), LORASHIP_NOTE]


class MergedRepo(ArtifactRepo):
    name = "merged"
    suffix = ""
    title = "transformers"
    description = "the merged model (safetensors, config, tokenizer/processor, generation config, chat template)"
    artifact = "merged"
    allowed = staticmethod(merged_file_allowed)
    absent = "no merged model in this run (the merge stage did not run)"

    def missing(self, art: Artifact) -> str | None:
        if not any(f.path.endswith(".safetensors") for f in art.files):
            return "the merged model has no safetensors weights"
        return None


class AdapterRepo(ArtifactRepo):
    name = "adapter"
    suffix = "-LoRA"
    title = "LoRA adapter"
    description = "the LoRA adapter (adapter_config.json, safetensors weights, tokenizer) for peft"
    artifact = "adapter"
    allowed = staticmethod(adapter_file_allowed)
    absent = "no adapter in this run (the download stage did not run)"
    at_root = ("adapter_config.json",)

    def missing(self, art: Artifact) -> str | None:
        names = {f.path for f in art.files}
        if "adapter_config.json" not in names:
            return "the adapter folder has no adapter_config.json"
        if not any(n.endswith(".safetensors") for n in names):
            return "the adapter has no safetensors weights (only a pickle, which is never published)"
        return None


HUB_REPOS: Registry[HubRepo] = Registry(
    "hub repo kind",
    "hub.repos",
    [MergedRepo(), GgufRepo(), AdapterRepo()],
    # any machine can publish any kind; whether this run made what a kind needs is unavailable(job)
    contract=Contract(HubRepo, run="stage", unavailable=lambda repo: None),
)
