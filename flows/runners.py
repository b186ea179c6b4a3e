"""One runner per stage: how the flow feeds a stage from the config and what came before.

A runner takes the RunContext and returns the artifacts it made (or raises StageSkipped with the
reason). It reads like the pipeline diagram: pick the inputs, call the stage's task through
`ctx.call` / `ctx.map` (cached, retried), return the records. Stage work itself lives in tasks/.
"""

from __future__ import annotations

from typing import Callable

from flows.context import RunContext
from tasks.core.artifacts import Artifact
from tasks.core.errors import PermanentError, StageSkipped


def _need(ctx: RunContext, kind: str, stage: str) -> list[Artifact]:
    found = ctx.of_kind(kind)
    if not found:
        raise PermanentError(f"stage {stage} needs a {kind!r} artifact and none was made in this run", hint=f"enable the stage that makes it, or run with --from {stage} after a run that made it")
    return found


def run_download(ctx: RunContext) -> list[Artifact]:
    from tasks.download import download_task

    adapter = ctx.call("download", download_task, ctx.config.source, ctx.run.adapter_dir)
    m = adapter.meta
    how = "already up to date" if m.get("method") == "none" else f"fetched {m.get('files_fetched')} file(s) by {m.get('method')}"
    ctx.notes.setdefault("messages", {})["download"] = f"{len(adapter.files)} file(s), {adapter.size / 1e6:.1f} MB from {m.get('source')}: {how}"
    ctx.notes.setdefault("links", {})["download_record"] = str(ctx.run.root / "download.json")
    return [adapter]


def _not_yet(stage: str) -> Callable[[RunContext], list[Artifact]]:
    def runner(ctx: RunContext) -> list[Artifact]:
        raise StageSkipped(f"the {stage} stage is not available in this build yet")

    return runner


def run_merge(ctx: RunContext) -> list[Artifact]:
    from tasks.merge import base_fingerprint, merge_task

    adapter = _need(ctx, "adapter", "merge")[0]
    settings, default_base = ctx.config.merge, ctx.config.model.base_model
    base_key = base_fingerprint(settings, default_base, adapter)
    merged = ctx.call("merge", merge_task, adapter, settings, ctx.run.merged_dir, default_base, base_key)
    diff = merged.meta.get("max_abs_logit_diff")
    check = f"max |logit diff| vs peft {diff:.2g}" if diff is not None else "not verified (" + str(merged.meta.get("verify_skipped")) + ")"
    ctx.notes.setdefault("messages", {})["merge"] = f"{merged.meta.get('backend')} merge, {merged.meta.get('dtype')}, {merged.size / 1e6:.1f} MB; {check}"
    return [merged]


run_convert = _not_yet("convert")
run_quantize = _not_yet("quantize")
def _hub_token(ctx: RunContext, ref, what: str):
    """A configured secret reference resolved (missing: a clear error); None when none is configured."""
    return ref.resolve(required=True) if ref is not None else None


def run_hub_push(ctx: RunContext) -> list[Artifact]:
    from tasks.hub_push import hub_push_task

    ggufs = _need(ctx, "gguf", "hub_push")
    token = None if ctx.dry_run else _hub_token(ctx, ctx.config.hub.token, "hub.token")
    dry = ctx.dry_run or token is None
    made = ctx.call(
        "hub_push", hub_push_task, ggufs, ctx.config.hub, ctx.config.card, ctx.run.publish_dir, ctx.run.reports_dir,
        model_name=ctx.config.model.name, version=ctx.config.model.version, base_model=ctx.config.model.base_model,
        description=ctx.config.model.description, adapter=ctx.artifacts.get("adapter"), merged=ctx.artifacts.get("merged"),
        eval_report=ctx.artifacts.get("report:eval"), dry_run=dry, _token=token,
    )
    if made.meta.get("dry_run"):
        ctx.notes.setdefault("dry_run", {})["hub_push"] = True
        ctx.notes.setdefault("links", {})["hub repo (staged, not pushed)"] = made.meta["staged"]
        ctx.notes.setdefault("messages", {})["hub_push"] = f"dry run ({made.meta.get('reason')}): would push {len(made.files)} files to {made.meta['repo_id']}; staged in {made.meta['staged']}"
    else:
        ctx.notes.setdefault("links", {})["hub repo"] = made.meta["url"]
        ctx.notes.setdefault("messages", {})["hub_push"] = f"{made.meta['url']}: {len(made.meta.get('uploaded', []))} file(s) sent, {len(made.meta.get('skipped', []))} unchanged"
    return [made]


def run_card(ctx: RunContext) -> list[Artifact]:
    from tasks.card import card_task

    ggufs = _need(ctx, "gguf", "card")
    pushed = ctx.artifacts.get("publish:hub")
    if pushed is not None:
        repo_id, endpoint = pushed.meta.get("repo_id", ""), pushed.meta.get("endpoint")
    else:
        from tasks.hub_push import default_repo_id

        repo_id, endpoint = default_repo_id(ctx.config.hub, ctx.config.model.name, None), ctx.config.hub.endpoint
    real = pushed is not None and not pushed.meta.get("dry_run") and not ctx.dry_run
    token = _hub_token(ctx, ctx.config.hub.token, "hub.token") if real else None
    made = ctx.call(
        "card", card_task, ggufs, ctx.config.card, ctx.run.reports_dir / "README.md",
        model_name=ctx.config.model.name, version=ctx.config.model.version, repo_id=repo_id, base_model=ctx.config.model.base_model,
        description=ctx.config.model.description, adapter=ctx.artifacts.get("adapter"), eval_report=ctx.artifacts.get("report:eval"),
        pushed=pushed if real else None, endpoint=endpoint, _token=token,
    )
    ctx.notes.setdefault("links", {})["model card"] = made.path
    ctx.notes.setdefault("messages", {})["card"] = f"{made.path} ({'with' if made.meta.get('has_eval') else 'no'} eval numbers)" + (f"; updated on the Hub ({made.meta['commit'][:12]})" if made.meta.get("commit") else "")
    return [made]


def run_space(ctx: RunContext) -> list[Artifact]:
    from tasks.space import space_task

    pushed = ctx.artifacts.get("publish:hub")
    if pushed is None:
        raise PermanentError("the space stage needs the hub_push record (publish:hub) and this run has none", hint="enable hub_push, or run with --from space after a run that pushed")
    ggufs = _need(ctx, "gguf", "space")
    real = not pushed.meta.get("dry_run") and not ctx.dry_run
    token = _hub_token(ctx, ctx.config.hub.token, "hub.token") if real else None
    read_token = _hub_token(ctx, ctx.config.space.read_token, "space.read_token") if real else None
    made = ctx.call(
        "space", space_task, pushed, ggufs, ctx.config.space, ctx.run.publish_dir, model_name=ctx.config.model.name,
        license=ctx.config.card.license, dry_run=not real, _token=token, _read_token=read_token,
    )
    if made.meta.get("dry_run"):
        ctx.notes.setdefault("dry_run", {})["space"] = True
        ctx.notes.setdefault("links", {})["Space (staged, not deployed)"] = made.meta["staged"]
        ctx.notes.setdefault("messages", {})["space"] = f"dry run ({made.meta.get('reason')}): Space folder for {made.meta['space_id']} in {made.meta['staged']}"
    else:
        ctx.notes.setdefault("links", {})["Space"] = made.meta["url"]
        ctx.notes.setdefault("messages", {})["space"] = f"{made.meta['url']}: {made.meta.get('stage', 'deployed')}"
    return [made]


run_local_deploy = _not_yet("local_deploy")
run_serve = _not_yet("serve")
run_health = _not_yet("health")
run_evaluate = _not_yet("evaluate")


RUNNERS: dict[str, Callable[[RunContext], list[Artifact]]] = {
    "download": run_download,
    "merge": run_merge,
    "convert": run_convert,
    "quantize": run_quantize,
    "hub_push": run_hub_push,
    "card": run_card,
    "space": run_space,
    "local_deploy": run_local_deploy,
    "serve": run_serve,
    "health": run_health,
    "evaluate": run_evaluate,
}
