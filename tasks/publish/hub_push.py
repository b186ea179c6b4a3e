"""Stage 5, Hub push: the GGUFs, card, training metadata and manifest to a model repo in ONE commit.

What goes in the commit (the "repo folder", staged under publish/hub/<owner>__<name>/ first, big files
hard-linked, so a dry run shows exactly what would be sent): every GGUF, README.md (the model card,
rendered here by tasks.publish.card so it lands in the same commit), loraship.json (the published artifacts
with their digests and provenance, no timestamps, so an unchanged run publishes an identical file),
training/*.json (adapter_config, trainer_state, ... from the download stage's metadata), and optionally
adapter/ and merged/. Only what tasks/publish/allowlist.py allows is staged (never a pickle or a
marker), and the staged folder is scanned for secrets before anything is sent
(tasks/publish/secret_scan.py): a hit refuses the push, naming the file.

How: whoami (a bad token fails before any upload), create_repo(exist_ok), the Hub validates the card's
YAML, then the repo's current tree is compared with the local files (LFS sha256 / git blob sha1): only
changed files are uploaded, and an unchanged push sends no file and makes no commit. LFS files are
uploaded one by one ahead of the commit (`preupload_lfs_files`): a retried run asks the LFS batch API
again, which answers "already stored" for what made it, so a large upload resumes instead of starting
over, and still ends in one commit. Then the version is tagged. 5xx/timeouts are retried by the stage
task; 401/403/404 fail at once (tasks.publish.hub_io.translate).

No token (the demo) or --dry-run: only the staged folder is written, and the stage says where.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_dir, atomic_write_json
from tasks.core.errors import PermanentError
from tasks.core.hashing import iter_files
from tasks.core.settings import SecretRef, StrictModel, check_hub_id
from tasks.core.vocab import ArtifactKind, Stage
from tasks.gguf import quant_types
from tasks.publish.allowlist import (
    adapter_file_allowed,
    artifact_entry,
    merged_file_allowed,
    repo_file_allowed,
    training_file_allowed,
)
from tasks.publish.card import DEFAULT_TEMPLATE, build_card
from tasks.publish.hub_io import hub_api, push_folder, whoami
from tasks.publish.secret_scan import refuse_secrets

STAGE = Stage.HUB_PUSH
log = logging.getLogger("loraship.hub_push")


class HubSettings(StrictModel):
    repo_id: str = Field(
        "", description="owner/name of the model repo; empty: <organization or token user>/<model>-GGUF"
    )
    organization: str | None = Field(None, description="namespace to create the repo in when repo_id is empty")
    private: bool = Field(False, description="create the repo private (an existing repo keeps its visibility)")
    token: SecretRef | None = Field(
        None, description="write token reference, e.g. 'env:HF_TOKEN' or 'block:hub-credentials/main'; none: dry run"
    )
    endpoint: str | None = Field(None, description="Hub URL; empty: HF_ENDPOINT or https://huggingface.co")
    include_adapter: bool = Field(True, description="upload the LoRA adapter folder as adapter/")
    include_merged: bool = Field(False, description="upload the merged safetensors as merged/ (large)")
    include_f16: bool = Field(True, description="upload the F16 GGUF too")
    tag_version: bool = Field(True, description="tag the commit with model.version")
    commit_message: str = Field("", description="commit title; empty: 'loraship: <model> <version>'")

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, v: str) -> str:
        return check_hub_id(v, "repo_id", "the model name")


# --- what goes in the repo ------------------------------------------------------------------------


def default_repo_id(settings: HubSettings, model_name: str, user: str | None) -> str:
    if settings.repo_id:
        return settings.repo_id
    owner = settings.organization or user or "your-username"
    return f"{owner}/{model_name}-GGUF"


def _published_files(a: Artifact) -> dict[str, str] | None:
    """A folder artifact's files that the allow-list publishes (relative path -> sha256); None for a file."""
    if not a.is_dir:
        return None
    allowed = {"adapter": adapter_file_allowed, "merged": merged_file_allowed}.get(a.kind, lambda rel: True)
    return {f.path: f.sha256 for f in a.files if allowed(f.path)}


def publish_manifest(artifacts: list[Artifact], model: str, version: str, repo_id: str) -> dict[str, Any]:
    """loraship.json: what was published and where it came from.

    Only the fields tasks/publish/allowlist.py allows per artifact kind (digests, sizes, tool versions,
    quantization facts, quality numbers): nothing about this machine or this run's timings, so an
    unchanged run publishes a byte-identical file. `stage_repo_folder` adds `published_files`, every path
    this project put in the repo (what a later run compares against to delete what left the run).
    """
    out: dict[str, Any] = {"schema_version": 2, "model": model, "version": version, "repo_id": repo_id}
    out["artifacts"] = {a.name: artifact_entry(a, _published_files(a)) for a in sorted(artifacts, key=lambda a: a.name)}
    return out


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        try:
            os.symlink(src.resolve(), dst)
        except OSError:
            shutil.copy2(src, dst)


def stage_repo_folder(
    dest: Path,
    *,
    ggufs: list[Artifact],
    card_text: str,
    manifest: dict[str, Any],
    adapter: Artifact | None,
    merged: Artifact | None,
    settings: HubSettings,
    splits: list[Artifact] | None = None,
) -> dict[str, str]:
    """Write the exact repo folder to `dest` (atomically). Returns {repo path: sha256 already known}.

    A GGUF that the quantize stage split into shards (quantization.split_max_size) is published as its
    shard folder `<model>-<QUANT>/` instead of the single file: that is what the split is for (the Hub
    refuses files over 50 GB), and llama.cpp loads the set from its first shard.
    """
    known: dict[str, str] = {}
    split_of = {str(a.meta.get("unsplit")): a for a in splits or []}
    left_out: list[str] = []
    with atomic_dir(dest) as tmp:
        for g in ggufs:
            split = split_of.get(Path(g.path).name)
            if split is not None:
                folder = Path(split.path)
                for f in split.files:
                    _link(folder / f.path, tmp / folder.name / f.path)
                    known[f"{folder.name}/{f.path}"] = f.sha256
                continue
            _link(Path(g.path), tmp / Path(g.path).name)
            known[Path(g.path).name] = g.sha256
        if adapter is not None:
            for name, p in sorted(training_files(adapter).items()):
                _link(Path(p), tmp / "training" / name)
            if settings.include_adapter:
                for f in adapter.files:
                    if not adapter_file_allowed(f.path):
                        left_out.append(f"adapter/{f.path}")
                        continue
                    _link(Path(adapter.path) / f.path, tmp / "adapter" / f.path)
                    known[f"adapter/{f.path}"] = f.sha256
        if merged is not None and settings.include_merged:
            for f in merged.files:
                if not merged_file_allowed(f.path):
                    left_out.append(f"merged/{f.path}")
                    continue
                _link(Path(merged.path) / f.path, tmp / "merged" / f.path)
                known[f"merged/{f.path}"] = f.sha256
        (tmp / "README.md").write_text(card_text, encoding="utf-8")
        names = sorted({*(rel.as_posix() for rel in iter_files(tmp)), "loraship.json"})
        atomic_write_json(tmp / "loraship.json", {**manifest, "published_files": names})
        outside = [n for n in names if not repo_file_allowed(n)]
        if outside:  # every path above is allowed by construction: this is the last line of defence
            raise PermanentError(f"refusing to stage {', '.join(outside)}: not on the publish allow-list")
    if left_out:
        log.info("not published (not on the allow-list: pickles, markers, other files): %s", ", ".join(left_out))
    return known


def training_files(adapter: Artifact) -> dict[str, str]:
    """The training metadata files that are published under training/: JSON only."""
    files = adapter.meta.get("metadata_files") or {}
    return {n: p for n, p in files.items() if training_file_allowed(n) and Path(p).is_file()}


def repo_notes(adapter: Artifact | None, merged: Artifact | None, settings: HubSettings) -> list[dict[str, str]]:
    """The non-GGUF files of the repo, for the card's 'Other files' section."""
    notes = []
    if adapter is not None and training_files(adapter):
        notes.append(
            {
                "path": "training/",
                "what": "training configuration and results (" + ", ".join(sorted(training_files(adapter))) + ")",
            }
        )
    if adapter is not None and settings.include_adapter:
        notes.append({"path": "adapter/", "what": "the LoRA adapter (peft) the GGUFs were merged from"})
    if merged is not None and settings.include_merged:
        notes.append({"path": "merged/", "what": "the merged model as safetensors (for transformers)"})
    notes.append({"path": "loraship.json", "what": "every published file with its sha256 and provenance"})
    return notes


# --- the stage ------------------------------------------------------------------------------------


def hub_push(
    ggufs: list[Artifact],
    settings: HubSettings,
    card_settings: Any,
    publish_dir: Path,
    reports_dir: Path,
    *,
    model_name: str,
    version: str,
    base_model: str = "",
    description: str = "",
    adapter: Artifact | None = None,
    merged: Artifact | None = None,
    eval_report: Artifact | None = None,
    token: Any = None,
    dry_run: bool = False,
    splits: list[Artifact] | None = None,
    template_contract: Artifact | None = None,
) -> Artifact:
    """Stage the repo folder and (with a token, not dry_run) push it in one commit. Returns the 'publish:hub' record."""

    ggufs = [g for g in ggufs if settings.include_f16 or not quant_types.is_float(str(g.meta.get("quant", "")))]
    if not ggufs:
        raise PermanentError(
            "nothing to push: no GGUF artifacts in this run",
            hint="enable the convert and quantize stages, or run with --from hub_push after a run that made them",
        )
    secret = token.get_secret_value() if token is not None else None
    will_push = bool(secret) and not dry_run
    user = None
    if will_push and not settings.repo_id:
        user = whoami(hub_api(settings.endpoint, secret), secret).get("name")
    repo_id = default_repo_id(settings, model_name, user)
    endpoint = (settings.endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    publishable = [
        *ggufs,
        *([adapter] if adapter is not None and settings.include_adapter else []),
        *([merged] if merged is not None and settings.include_merged else []),
    ]
    manifest = publish_manifest(publishable, model_name, version, repo_id)
    extra_preview = repo_notes(adapter, merged, settings)
    card_text = build_card(
        ggufs,
        model_name=model_name,
        version=version,
        repo_id=repo_id,
        settings=card_settings,
        base_model=base_model,
        description=description or card_settings.description,
        adapter=adapter,
        eval_report=eval_report,
        extra_files=extra_preview,
        endpoint=endpoint,
        splits=splits,
        template_contract=template_contract,
    )
    folder = publish_dir / "hub" / repo_id.replace("/", "__")
    known = stage_repo_folder(
        folder,
        ggufs=ggufs,
        card_text=card_text,
        manifest=manifest,
        adapter=adapter,
        merged=merged,
        settings=settings,
        splits=splits,
    )
    refuse_secrets(folder, f"to {repo_id}")  # before any upload, also in a dry run (it shows what would go)
    notes = extra_preview
    card_sha = hashlib.sha256(card_text.encode()).hexdigest()
    meta: dict[str, Any] = {
        "repo_id": repo_id,
        "endpoint": endpoint,
        "private": settings.private,
        "dry_run": not will_push,
        "card_sha256": card_sha,
        "extra_files": notes,
        "url": f"{endpoint}/{repo_id}",
        "staged": str(folder),
    }
    if will_push:
        message = settings.commit_message or f"loraship: {model_name} {version}"
        result = push_folder(
            folder,
            repo_id,
            token=secret,
            endpoint=settings.endpoint,
            private=settings.private,
            commit_message=message,
            commit_description=f"{len(ggufs)} GGUF file(s): "
            + ", ".join(sorted(str(g.meta.get("quant")) for g in ggufs)),
            tag=version if settings.tag_version else None,
            known=known,
            owned_list="loraship.json",
        )
        meta.update({k: v for k, v in result.items() if k != "url"})
        meta["url"] = result["url"] or meta["url"]
        log.info(
            "pushed %s: commit %s, %d file(s) sent, %d unchanged",
            meta["url"],
            (result["commit"] or "")[:12],
            len(result["uploaded"]),
            len(result["skipped"]),
        )
    else:
        why = "no hub.token configured" if not secret else "--dry-run"
        meta["reason"] = why
        log.info("dry run (%s): the repo folder that would be pushed to %s is %s", why, repo_id, folder)
    atomic_write_json(reports_dir / "hub_push.json", {k: v for k, v in meta.items() if k != "extra_files"})
    inputs = [*ggufs, *(x for x in (adapter, merged, eval_report) if x is not None)]
    return Artifact.from_path(
        folder,
        name="publish:hub",
        kind=ArtifactKind.PUBLISH,
        stage=STAGE,
        inputs=inputs,
        settings=settings,
        tools=["huggingface_hub"],
        meta=meta,
        known=known,
    )


def _hub_push_task_fn(
    ggufs: list[Artifact],
    settings: HubSettings,
    card_settings: Any,
    publish_dir: Path,
    reports_dir: Path,
    model_name: str,
    version: str,
    base_model: str = "",
    description: str = "",
    adapter: Artifact | None = None,
    merged: Artifact | None = None,
    eval_report: Artifact | None = None,
    dry_run: bool = False,
    _token: Any = None,
    splits: list[Artifact] | None = None,
    template_contract: Artifact | None = None,
) -> Artifact:
    return hub_push(
        ggufs,
        settings,
        card_settings,
        publish_dir,
        reports_dir,
        model_name=model_name,
        version=version,
        base_model=base_model,
        description=description,
        adapter=adapter,
        merged=merged,
        eval_report=eval_report,
        token=_token,
        dry_run=dry_run or _token is None,
        splits=splits,
        template_contract=template_contract,
    )


def _make_task() -> Any:
    from tasks.core.stage import stage_task

    return stage_task(STAGE, key_files=[DEFAULT_TEMPLATE])(_hub_push_task_fn)  # it renders the card too


hub_push_task = _make_task()
