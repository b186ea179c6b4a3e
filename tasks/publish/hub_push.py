"""Stage 5, Hub push: each repo of `hub.repos` (merged, gguf, adapter: tasks/publish/repos.py) in ONE commit.

What goes in a repo's commit (its "repo folder", staged under publish/hub/<owner>__<name>/ first, big
files hard-linked, so a dry run shows exactly what would be sent): the repo kind's files (the GGUFs; the
merged model; the adapter), training/*.json (adapter_config, trainer_state, ... from the download stage's
metadata), README.md (the repo's card, rendered here by tasks.publish.card so it lands in the same commit,
linking the run's other repos) and loraship.json (the published artifacts with their digests and
provenance, no timestamps, so an unchanged run publishes an identical file). Only what
tasks/publish/allowlist.py allows for that kind is staged (never a pickle, a marker or a local path), and
every staged folder is scanned for secrets before anything is sent (tasks/publish/secret_scan.py): a hit
refuses the push, naming the file. All repos are staged and scanned before the first one is pushed.

How: whoami (a bad token fails before any upload), create_repo(exist_ok), the Hub validates the card's
YAML, then the repo's current tree is compared with the local files (LFS sha256 / git blob sha1): only
changed files are uploaded, and an unchanged push sends no file and makes no commit. LFS files are
uploaded one by one ahead of the commit (`preupload_lfs_files`): a retried run asks the LFS batch API
again, which answers "already stored" for what made it, so a large upload resumes instead of starting
over, and still ends in one commit. Then the version is tagged. Repos are pushed merged first, so the
GGUF card's `base_model` names a repo that exists. 5xx/timeouts are retried by the stage
task; 401/403/404 fail at once (tasks.publish.hub_io.translate).

No token (the demo) or --dry-run: only the staged folder is written, and the stage says where.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_dir, atomic_write_json
from tasks.core.errors import PermanentError
from tasks.core.hashing import iter_files
from tasks.core.settings import SecretRef, StrictModel, check_hub_id
from tasks.core.stage import stage_task
from tasks.core.vocab import ArtifactKind, Stage
from tasks.gguf import quant_types
from tasks.publish.allowlist import (
    adapter_file_allowed,
    artifact_entry,
    is_local_path,
    local_path_leaks,
    merged_file_allowed,
    repo_file_allowed,
)
from tasks.publish.card import DEFAULT_TEMPLATE, base_model_names, build_card, planned_space
from tasks.publish.hub_io import hub_api, hub_endpoint, push_folder, repo_url, whoami
from tasks.publish.repos import HUB_REPOS, RepoJob
from tasks.publish.secret_scan import refuse_secrets

STAGE = Stage.HUB_PUSH
log = logging.getLogger("loraship.hub_push")


class HubSettings(StrictModel):
    repos: list[str] = Field(
        default_factory=lambda: ["gguf"],
        description=(
            "the repos to publish, each in one commit: gguf (<owner>/<model>-GGUF), merged (<owner>/<model>: "
            "the merged model for transformers), adapter (<owner>/<model>-LoRA: the adapter for peft)"
        ),
    )
    repo_id: str = Field(
        "", description="owner/name of the GGUF repo; empty: <organization or token user>/<model>-GGUF"
    )
    repo_ids: dict[str, str] = Field(
        default_factory=dict,
        description="owner/name per repo kind, e.g. {merged: acme/tiny-chat}; empty: the owner and the kind's suffix",
    )
    organization: str | None = Field(None, description="namespace to create the repo in when repo_id is empty")
    private: bool = Field(False, description="create the repo private (an existing repo keeps its visibility)")
    token: SecretRef | None = Field(
        None, description="write token reference, e.g. 'env:HF_TOKEN' or 'block:hub-credentials/main'; none: dry run"
    )
    endpoint: str | None = Field(None, description="Hub URL; empty: HF_ENDPOINT or https://huggingface.co")
    include_adapter: bool = Field(
        True, description="upload the LoRA adapter folder as adapter/ of the GGUF repo (not when repos has adapter)"
    )
    include_merged: bool = Field(
        False, description="upload the merged safetensors as merged/ of the GGUF repo (large; not when repos has it)"
    )
    include_f16: bool = Field(True, description="upload the F16 GGUF too")
    tag_version: bool = Field(True, description="tag the commit with model.version")
    commit_message: str = Field("", description="commit title; empty: 'loraship: <model> <version>'")

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, v: str) -> str:
        return check_hub_id(v, "repo_id", "the model name")

    @field_validator("repos")
    @classmethod
    def _repos(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("hub.repos is empty: name at least one of " + ", ".join(HUB_REPOS.names()))
        for name in v:
            HUB_REPOS.check(name)
        if len(set(v)) != len(v):
            raise ValueError(f"hub.repos names a repo twice: {v}")
        return [k for k in HUB_REPOS.names() if k in v]  # pushed in table order: merged before gguf

    @field_validator("repo_ids")
    @classmethod
    def _repo_ids(cls, v: dict[str, str]) -> dict[str, str]:
        for kind, rid in v.items():
            HUB_REPOS.check(kind)
            check_hub_id(rid, f"repo_ids.{kind}", "the model name")
        return v


# --- what goes in the repo ------------------------------------------------------------------------


def default_repo_id(settings: HubSettings, model_name: str, user: str | None, kind: str = "gguf") -> str:
    """The repo id of `kind`: hub.repo_id (gguf) or hub.repo_ids, else <owner>/<model><the kind's suffix>,
    the owner being hub.organization, the owner of hub.repo_id, or the token's user."""
    if kind == "gguf" and settings.repo_id:
        return settings.repo_id
    if settings.repo_ids.get(kind):
        return settings.repo_ids[kind]
    owner = settings.organization or (settings.repo_id.split("/")[0] if settings.repo_id else "") or user
    return f"{owner or 'your-username'}/{model_name}{HUB_REPOS.lookup(kind).suffix}"


def run_repo_ids(settings: HubSettings, model_name: str, user: str | None) -> dict[str, str]:
    """kind -> repo id for every repo of hub.repos (what the cards link)."""
    return {k: default_repo_id(settings, model_name, user, k) for k in settings.repos}


def primary_kind(repos: list[str]) -> str:
    """The repo the `publish:hub` record is about at its top level (the Space's model repo): the GGUF repo
    when it is published, else the first of hub.repos."""
    return "gguf" if "gguf" in repos else repos[0]


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


def stage_repo_folder(
    dest: Path, kind: str, job: RepoJob, *, card_text: str, manifest: dict[str, Any]
) -> dict[str, str]:
    """Write the exact `kind` repo folder to `dest` (atomically). Returns {repo path: sha256 already known}."""
    repo = HUB_REPOS.lookup(kind)
    with atomic_dir(dest) as tmp:
        staged = repo.stage(job, tmp)
        (tmp / "README.md").write_text(card_text, encoding="utf-8")
        names = sorted({*(rel.as_posix() for rel in iter_files(tmp)), "loraship.json"})
        atomic_write_json(tmp / "loraship.json", {**manifest, "published_files": names})
        outside = [n for n in names if not repo_file_allowed(n, kind)]
        if outside:  # every path above is allowed by construction: this is the last line of defence
            raise PermanentError(f"refusing to stage {', '.join(outside)} in the {kind} repo: not on the allow-list")
    if staged.left_out:
        log.info("not published (not on the allow-list: pickles, markers, other files): %s", ", ".join(staged.left_out))
    return staged.known


# --- the stage ------------------------------------------------------------------------------------


def hub_push_repos(
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
    space_id: str | None = None,
) -> list[Artifact]:
    """Stage every repo of hub.repos and (with a token, not dry_run) push each in one commit.

    Returns one record per repo (`record_name`: `publish:hub` for the GGUF repo, `publish:hub:<kind>`),
    pointing at its staged folder; meta: `repo_kind`, `repo_id`, `url`, `staged`, `dry_run` (+ `reason`),
    `card_sha256`, `extra_files`, after a push `commit`, `uploaded`, `skipped`, `deleted`, `tag`, and
    `repos` (kind -> repo id of every repo of the run: what the cards link).

    `space_id` (not None: the space stage deploys after this push; "" for its default id) puts the Space's
    link and embed snippet in the cards of a real push, so they need no second commit once it runs."""
    ggufs = [g for g in ggufs if settings.include_f16 or not quant_types.is_float(str(g.meta.get("quant", "")))]
    hub_base, _ = base_model_names(base_model, adapter, card_settings)
    job = RepoJob(
        ggufs=ggufs,
        splits=list(splits or []),
        adapter=adapter,
        merged=merged,
        # a kind published as its own repo is not copied into the GGUF repo too (the card links it instead)
        include_adapter=settings.include_adapter and "adapter" not in settings.repos,
        include_merged=settings.include_merged and "merged" not in settings.repos,
        base_hub_id=hub_base,
    )
    for kind, asked in (("adapter", settings.include_adapter), ("merged", settings.include_merged)):
        if asked and kind in settings.repos and "gguf" in settings.repos:
            log.info("hub.include_%s: %s/ is left out of the GGUF repo; the %s repo holds it", kind, kind, kind)
    missing = {k: why for k in settings.repos if (why := HUB_REPOS.lookup(k).unavailable(job))}
    if missing:
        raise PermanentError(
            "nothing to push for " + "; ".join(f"the {k} repo: {why}" for k, why in missing.items()),
            hint=(
                "enable the stages that make them (download, merge, convert, quantize), run with --from hub_push "
                "after a run that made them, or leave those kinds out of hub.repos"
            ),
        )
    secret = token.get_secret_value() if token is not None else None
    will_push = bool(secret) and not dry_run
    user = whoami(hub_api(settings.endpoint, secret), secret).get("name") if will_push else None
    repo_ids = run_repo_ids(settings, model_name, user)
    endpoint = hub_endpoint(settings.endpoint)
    space = None
    if will_push and space_id is not None:  # the space stage's default id: <model repo owner>/<model>-demo
        owner = repo_ids[primary_kind(settings.repos)].split("/")[0]
        space = planned_space(space_id or f"{owner}/{model_name}-demo", endpoint)

    staged: dict[str, dict[str, Any]] = {}
    for kind in settings.repos:  # stage and scan every repo before pushing any
        repo, repo_id = HUB_REPOS.lookup(kind), repo_ids[kind]
        notes = repo.notes(job)
        card_text = build_card(
            ggufs if kind == "gguf" else [],
            model_name=model_name,
            version=version,
            repo_id=repo_id,
            settings=card_settings,
            base_model=base_model,
            description=description or card_settings.description,
            adapter=adapter,
            eval_report=eval_report,
            extra_files=notes,
            endpoint=endpoint,
            splits=splits if kind == "gguf" else None,
            template_contract=template_contract if kind == "gguf" else None,
            kind=kind,
            repos=repo_ids,
            space=space,
        )
        folder = publish_dir / "hub" / repo_id.replace("/", "__")
        manifest = publish_manifest(repo.publishable(job), model_name, version, repo_id)
        known = stage_repo_folder(folder, kind, job, card_text=card_text, manifest=manifest)
        refuse_secrets(folder, f"to {repo_id}")  # before any upload, also in a dry run (it shows what would go)
        refuse_local_paths(folder, repo_id, local_paths(job, base_model))
        staged[kind] = {
            "repo_kind": kind,
            "repo_id": repo_id,
            "url": repo_url(endpoint, repo_id),
            "staged": str(folder),
            "dry_run": not will_push,
            "card_sha256": hashlib.sha256(card_text.encode()).hexdigest(),
            "extra_files": notes,
            "known": known,
        }

    if not will_push:
        why = "no hub.token configured" if not secret else "--dry-run"
        for rec in staged.values():
            rec["reason"] = why
            log.info("dry run (%s): the folder that would be pushed to %s is %s", why, rec["repo_id"], rec["staged"])
    made = []
    for kind, rec in staged.items():
        known = rec.pop("known")
        if will_push:
            rec.update(_push_repo(kind, rec, known, settings, secret, model_name, version, ggufs))
        repo = HUB_REPOS.lookup(kind)
        made.append(
            Artifact.from_path(
                rec["staged"],
                name=record_name(kind),
                kind=ArtifactKind.PUBLISH,
                stage=STAGE,
                inputs=_inputs(repo.publishable(job), adapter, eval_report),
                settings=settings,
                tools=["huggingface_hub"],
                meta={"endpoint": endpoint, "private": settings.private, **rec, "repos": repo_ids},
                known=known,
            )
        )
    report = {a.meta["repo_kind"]: {k: v for k, v in a.meta.items() if k != "extra_files"} for a in made}
    atomic_write_json(reports_dir / "hub_push.json", {**report[primary_kind(settings.repos)], "repos": report})
    return made


def _inputs(published: list[Artifact], *read: Artifact | None) -> list[Artifact]:
    """A record's inputs: what its repo publishes, and what its card was made from (training rows, eval)."""
    names = {a.name for a in published}
    return [*published, *(a for a in read if a is not None and a.name not in names)]


def local_paths(job: RepoJob, base_model: str) -> list[str]:
    """The folders of this machine and of the training box that nothing published may name: the run folder
    (where adapter/ and merged/ live), a local base model, the folder the adapter was trained in."""
    paths = [str(Path(a.path).parent) for a in (job.adapter, job.merged) if a is not None]
    if base_model and Path(base_model).expanduser().exists():
        paths.append(str(Path(base_model).expanduser().resolve()))
    source = str((job.adapter.meta.get("source") if job.adapter is not None else "") or "")
    where = source if is_local_path(source) else source.rsplit(":", 1)[-1]  # "ssh:host:/workspace/out"
    if is_local_path(where):
        paths.append(where)
    return paths


def refuse_local_paths(folder: Path, repo_id: str, paths: list[str]) -> None:
    """PermanentError naming the staged files that hold a local path (`allowlist.local_path_leaks`)."""
    leaks = local_path_leaks(folder, paths)
    if leaks:
        listed = "; ".join(f"{rel} names {path}" for rel, path in leaks[:10])
        raise PermanentError(
            f"refusing to publish to {repo_id}: staged files name local folders: {listed}",
            hint="remove the path from that file at its source (training output, card template, description)",
        )


def record_name(kind: str) -> str:
    """The manifest name of a repo's push record: `publish:hub` for the GGUF repo (what the Space and the
    card read since before hub.repos), `publish:hub:<kind>` for the others."""
    return "publish:hub" if kind == "gguf" else f"publish:hub:{kind}"


def push_records(artifacts: Any) -> list[Artifact]:
    """The push records among `artifacts` (the run's lineage), one per published repo, in hub.repos order."""
    order = HUB_REPOS.names()

    def rank(a: Artifact) -> int:
        kind = a.meta.get("repo_kind", "gguf")
        return order.index(kind) if kind in order else len(order)

    found = [a for a in artifacts if a.kind == ArtifactKind.PUBLISH and a.name.startswith("publish:hub")]
    return sorted(found, key=rank)


def hub_push(ggufs: list[Artifact], settings: HubSettings, *args: Any, **kwargs: Any) -> Artifact:
    """`hub_push_repos`, returning the primary repo's record (the GGUF repo's when published, else the first)."""
    made = hub_push_repos(ggufs, settings, *args, **kwargs)
    return next(a for a in made if a.meta["repo_kind"] == primary_kind(settings.repos))


def _push_repo(
    kind: str,
    rec: dict[str, Any],
    known: dict[str, str],
    settings: HubSettings,
    secret: str,
    model_name: str,
    version: str,
    ggufs: list[Artifact],
) -> dict[str, Any]:
    """Push one staged repo folder in one commit (only what differs from the Hub); its meta fields."""
    message = settings.commit_message or f"loraship: {model_name} {version}"
    what = {
        "gguf": f"{len(ggufs)} GGUF file(s): " + ", ".join(sorted(str(g.meta.get("quant")) for g in ggufs)),
        "merged": "the merged model (safetensors) for transformers",
        "adapter": "the LoRA adapter for peft",
    }.get(kind, kind)
    result = push_folder(
        Path(rec["staged"]),
        rec["repo_id"],
        token=secret,
        endpoint=settings.endpoint,
        private=settings.private,
        commit_message=message,
        commit_description=what,
        tag=version if settings.tag_version else None,
        known=known,
        owned_list="loraship.json",
    )
    out = {k: v for k, v in result.items() if k != "url"}
    out["url"] = result["url"] or rec["url"]
    log.info(
        "pushed %s: commit %s, %d file(s) sent, %d unchanged",
        out["url"],
        (result["commit"] or "")[:12],
        len(result["uploaded"]),
        len(result["skipped"]),
    )
    return out


@stage_task(STAGE, key_files=[DEFAULT_TEMPLATE])  # it renders the card too
def hub_push_task(
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
    space_id: str | None = None,
) -> list[Artifact]:
    return hub_push_repos(
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
        space_id=space_id,
    )
