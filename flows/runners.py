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
run_hub_push = _not_yet("hub_push")
run_card = _not_yet("card")
run_space = _not_yet("space")
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
