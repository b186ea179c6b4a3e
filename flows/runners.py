"""One runner per stage: how the flow feeds a stage from the config and what came before.

A runner takes the RunContext and returns the artifacts it made (or raises StageSkipped with the
reason). It reads like the pipeline diagram: pick the inputs, call the stage's task through
`ctx.call` / `ctx.map` (cached, retried), return the records. Stage work itself lives in tasks/.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.cleanup import remove_intermediates
from tasks.core.artifacts import Artifact
from tasks.core.errors import PermanentError, StageSkipped
from tasks.core.vocab import ArtifactKind, HealthVerdict, Stage
from tasks.gguf import quant_types
from tasks.publish.space_templates import SPACE_TEMPLATES

log = logging.getLogger("loraship.flow")

if TYPE_CHECKING:  # the context imports the config, which is built from the stage table, which names these runners
    from flows.context import RunContext
    from tasks.core.lineage import Lineage


def _need(ctx: RunContext, kind: ArtifactKind, stage: str) -> list[Artifact]:
    found = ctx.of_kind(kind)
    if not found:
        raise PermanentError(
            f"stage {stage} needs a {kind!r} artifact and none was made in this run",
            hint=f"enable the stage that makes it, or run with --from {stage} after a run that made it",
        )
    return found


def run_download(ctx: RunContext) -> list[Artifact]:
    from tasks.download.stage import download_task

    adapter = ctx.call("download", download_task, ctx.config.source, ctx.run.adapter_dir)
    m = adapter.meta
    how = (
        "already up to date"
        if m.get("method") == "none"
        else f"fetched {m.get('files_fetched')} file(s) by {m.get('method')}"
    )
    ctx.notes.setdefault("messages", {})["download"] = (
        f"{len(adapter.files)} file(s), {adapter.size / 1e6:.1f} MB from {m.get('source')}: {how}"
    )
    ctx.notes.setdefault("links", {})["download_record"] = str(ctx.run.root / "download.json")
    return [adapter]


def run_merge(ctx: RunContext) -> list[Artifact]:
    from tasks.merge.stage import base_fingerprint, merge_task

    adapter = _need(ctx, ArtifactKind.ADAPTER, "merge")[0]
    settings, default_base = ctx.config.merge, ctx.config.model.base_model
    base_key = base_fingerprint(settings, default_base, adapter)
    needs = merged_weights_needed(ctx.config)
    fused = settings.fused_convert and not needs
    shared = None
    if settings.fused_convert and needs:
        if Stage.CONVERT in ctx.selected:  # the shared read: one converter run writes merged/ and the GGUF
            from tasks.merge.fused import SharedRead

            shared = SharedRead.of(ctx.config.convert, ctx.config.model.name, ctx.run.gguf_dir)
            log.info("merge.fused_convert: %s needs merged/: it and the GGUF are written from one read", needs)
        else:
            log.info("merge.fused_convert: merged/ is written in full, %s needs it", needs)
    merged = ctx.call("merge", merge_task, adapter, settings, ctx.run.merged_dir, default_base, base_key, fused, shared)
    diff, tensors = merged.meta.get("max_abs_logit_diff"), merged.meta.get("tensor_check") or {}
    check = f"{tensors['tensors_checked']} tensors checked (worst {tensors['max_err_ulps']} ulps); " if tensors else ""
    check += (
        f"max |logit diff| vs peft {diff:.2g} (limit {merged.meta.get('verify_limit', 0):.2g})"
        if diff is not None
        else "logits not compared (" + str(merged.meta.get("verify_skipped")) + ")"
    )
    ctx.notes.setdefault("messages", {})["merge"] = (
        f"{merged.meta.get('backend')} merge, {merged.meta.get('dtype')}, {merged.size / 1e6:.1f} MB; {check}"
    )
    return [merged]


def merged_weights_needed(config: Any) -> str | None:
    """Which setting needs merged/'s safetensors after convert (so merge.fused_convert still writes them), or None:
    merged/ inside the GGUF repo, a merged-model repo, the transformers serve engine, a Space template that runs
    from the merged repo."""
    if config.hub.include_merged:
        return "hub.include_merged"
    if "merged" in config.hub.repos:
        return "hub.repos: merged"
    if config.serving.engine == "transformers":
        return "serving.engine: transformers"
    template = config.space.template  # validated against the registry; auto picks from the repos above
    if template != "auto" and SPACE_TEMPLATES[template].manifest.runs_from == "merged":
        return f"space.template: {template}"
    return None


def run_convert(ctx: RunContext) -> list[Artifact]:
    from tasks.gguf.convert import UnsupportedArchitecture, convert_task

    merged = _need(ctx, ArtifactKind.MERGED, "convert")[0]
    try:
        f16 = ctx.call("convert", convert_task, merged, ctx.config.convert, ctx.run.gguf_dir, ctx.config.model.name)
    except UnsupportedArchitecture as exc:  # a speech/vision model: no GGUF; the merged repo is the product
        ctx.notes["gguf_skipped"] = str(exc).split("\n")[0]
        raise StageSkipped(ctx.notes["gguf_skipped"]) from exc
    m = f16.meta
    commit = str(m.get("llama_cpp_commit") or "?")[:9]
    msg = (
        f"{f16.meta['quant']} {f16.size / 1e6:.1f} MB, {m.get('tensor_count')} tensors, "
        f"llama.cpp {commit} ({m.get('converter_origin')})"
    )
    if m.get("tokenizer_check"):
        msg += "; tokenizer matches HF" if m["tokenizer_check"]["matches"] else "; TOKENIZER DIFFERS"
    made = [f16]
    if ctx.config.convert.lora_adapter:
        from tasks.gguf.convert import convert_lora_task

        adapter = _need(ctx, ArtifactKind.ADAPTER, "convert")[0]
        lora = ctx.call(
            "convert",
            convert_lora_task,
            adapter,
            merged.local_path,
            ctx.config.convert,
            ctx.run.gguf_dir,
            ctx.config.model.name,
        )
        made.append(lora)
        msg += f"; LoRA {Path(lora.path).name} ({lora.meta['tensor_count']} tensors)"
    msg += _clean_up(ctx, [merged, *made])
    ctx.notes.setdefault("messages", {})["convert"] = msg
    return made


def _clean_up(ctx: RunContext, artifacts: list[Artifact]) -> str:
    """pipeline.cleanup right after the stage that consumed an intermediate (flows/cleanup.py's rule); the
    stage message's tail saying what went."""
    said = ""
    for art, setting in remove_intermediates(ctx.config, artifacts):
        ctx.artifacts.pop(art.name, None)
        said += f"; {art.local_path.name}{'/' if art.is_dir else ''} deleted (pipeline.cleanup.{setting})"
    return said


def run_quantize(ctx: RunContext) -> list[Artifact]:
    from prefect import unmapped

    from tasks.gguf.plan import plan_jobs
    from tasks.gguf.quantize import quantize_task

    if ctx.notes.get("gguf_skipped"):
        raise StageSkipped(f"no GGUF to quantize: {ctx.notes['gguf_skipped']}")
    ggufs = _need(ctx, ArtifactKind.GGUF, "quantize")
    source_name = f"gguf:{ctx.config.convert.outtype.upper()}"
    f16 = ctx.artifacts.get(source_name) or next((a for a in ggufs if a.stage == Stage.CONVERT), None)
    if f16 is None:
        raise PermanentError(
            f"stage quantize needs the converted {source_name} file",
            hint="enable the convert stage, or run with --from convert",
        )
    s, perf = ctx.config.quantization, ctx.config.performance
    types = [q for q in s.types if q != f16.meta.get("quant")]
    if not types:
        raise StageSkipped(f"quantization.types only names {f16.meta.get('quant')}, which convert already made")
    plan = plan_jobs(f16.local_path, types, threads=s.threads or perf.threads, parallel=s.parallel or perf.parallelism)
    if s.compute_imatrix and not s.imatrix:  # one imatrix for every type, computed (or found cached) here
        from tasks.gguf.quantize import with_imatrix

        if s.calibration is None and ctx.config.evaluation.heldout_text:
            s = s.model_copy(update={"calibration": ctx.config.evaluation.heldout_text})
        s = with_imatrix(f16, s, ctx.run.gguf_dir, threads=plan.threads)
    from tasks.core.caching import module_code_version

    # computed once here: mapped tasks computing their cache keys at the same time race inside ast.parse
    # (CPython 3.11: "AST constructor recursion depth mismatch"), and the failed key means no cache record
    module_code_version(quantize_task.fn.__module__)
    order = plan.start_order(types)  # costliest first
    mapped = ctx.map(
        "quantize",
        quantize_task,
        f16=unmapped(f16),
        quant=order,
        settings=unmapped(s),
        out_dir=unmapped(ctx.run.gguf_dir),
        model_name=unmapped(ctx.config.model.name),
        _threads=[plan.threads_for(q) for q in order],
        _max_buf=unmapped(plan.max_buf_size),
        _slots=unmapped(plan.parallel),
        _plan_key=unmapped(str(ctx.run.root)),
        _rank=list(range(len(order))),
    )
    by_quant = {a.meta["quant"]: a for a in mapped}
    made = [by_quant[q] for q in types if q in by_quant]
    msg = ", ".join(f"{a.meta['quant']} {a.size / 1e6:.1f} MB ({a.meta.get('bits_per_weight')} bpw)" for a in made)
    msg += f"; {plan.parallel} at once, threads " + ", ".join(f"{q} {plan.threads_for(q)}" for q in order)
    splits: list[Artifact] = []
    if s.split_max_size:  # shards for publishing (kind gguf-split); the unsplit files stay the gguf artifacts
        from tasks.gguf.split import parse_size, split_task

        limit = parse_size(s.split_max_size)
        big = [a for a in ([] if ctx.config.pipeline.cleanup.delete_f16 else [f16]) + made if a.size > limit]
        if big:
            module_code_version(split_task.fn.__module__)
            splits = [
                a
                for a in ctx.map(
                    "quantize",
                    split_task,
                    gguf=big,
                    max_size=unmapped(s.split_max_size),
                    out_dir=unmapped(ctx.run.gguf_dir),
                    model_name=unmapped(ctx.config.model.name),
                    generate_tokens=unmapped(s.generate_tokens),
                    _threads=unmapped(plan.threads),
                )
                if a is not None
            ]
        msg += "; split: " + (
            ", ".join(f"{a.meta['quant']} into {a.meta['split_count']}" for a in splits)
            or f"none above {s.split_max_size}"
        )
    msg += _clean_up(ctx, [f16, *made])
    ctx.notes.setdefault("messages", {})["quantize"] = msg
    return made + splits


def gate_evidence(config: Any) -> tuple[Stage, ...]:
    """What the release gate waits for under `config` (its row's `wants`): health when it requires a healthy
    verdict, evaluate when it has quality limits or a person approves with the eval table."""
    g = config.pipeline.gate
    wanted: list[Stage] = []
    if g is not None and g.require_healthy:
        wanted.append(Stage.HEALTH)
    if (g is not None and (g.any() or any(q.any() for q in g.quants.values()))) or config.pipeline.approval:
        wanted.append(Stage.EVALUATE)
    return tuple(wanted)


def run_gate(ctx: RunContext) -> list[Artifact]:
    from tasks.release.gate import gate_task

    p = ctx.config.pipeline
    ggufs = ctx.of_kind(ArtifactKind.GGUF)
    if not ggufs:
        if p.gate is not None or p.approval:  # fail closed: nothing decided, nothing published
            ctx.notes.setdefault("blocks", {})["gate"] = "no GGUFs in this run's lineage for the release gate"
        raise StageSkipped("no GGUFs in this run's lineage to decide on")
    health = [a for a in ctx.of_kind(ArtifactKind.REPORT) if a.stage == Stage.HEALTH]
    if p.approval and not os.environ.get("PREFECT_API_URL"):
        log.warning(
            "pipeline.approval: this run uses Prefect's temporary API, which has no UI; start `prefect server "
            "start` and set PREFECT_API_URL to approve from the UI (the API answers at the temporary server's URL)"
        )
    made = ctx.call(
        "gate",
        gate_task,
        ggufs,
        p.gate,
        ctx.run.reports_dir / "gate.json",
        eval_report=ctx.artifacts.get("report:eval"),
        health=health or None,
        approval=p.approval,
        approval_timeout_s=p.approval_timeout_s,
    )
    from tasks.release.gate import Decision

    decision = Decision.model_validate(made.meta)
    ctx.notes.setdefault("messages", {})["gate"] = decision.summary()
    ctx.notes["gate"] = made.meta
    if decision.blocked:
        ctx.notes.setdefault("blocks", {})["gate"] = decision.blocked
    return [made]


def _released(ctx: RunContext, stage: str, kind: ArtifactKind = ArtifactKind.GGUF) -> list[Artifact]:
    """The artifacts of `kind` the release gate lets `stage` publish or install (all when no gate ran)."""
    found = _need(ctx, kind, stage) if kind == ArtifactKind.GGUF else ctx.of_kind(kind)
    decision = ctx.artifacts.get("report:gate")
    if decision is None:
        return found
    passed = set(decision.meta.get("passed") or [])
    return [a for a in found if str(a.meta.get("quant")) in passed]


def _hub_token(ctx: RunContext, ref, what: str):
    """A configured secret reference resolved (missing: a clear error); None when none is configured."""
    return ref.resolve(required=True) if ref is not None else None


def run_hub_push(ctx: RunContext) -> list[Artifact]:
    from tasks.publish.hub_push import hub_push_task

    ggufs = _released(ctx, "hub_push") if "gguf" in ctx.config.hub.repos else []
    token = None if ctx.dry_run else _hub_token(ctx, ctx.config.hub.token, "hub.token")
    dry = ctx.dry_run or token is None
    made = ctx.call(
        "hub_push",
        hub_push_task,
        ggufs,
        ctx.config.hub,
        _card_settings(ctx),
        ctx.run.publish_dir,
        ctx.run.reports_dir,
        model_name=ctx.config.model.name,
        version=ctx.config.model.version,
        base_model=ctx.config.model.base_model,
        description=ctx.config.model.description,
        adapter=ctx.artifacts.get("adapter"),
        merged=ctx.artifacts.get("merged"),
        eval_report=ctx.artifacts.get("report:eval"),
        dry_run=dry,
        _token=token,
        splits=_released(ctx, "hub_push", ArtifactKind.GGUF_SPLIT) or None,
        template_contract=ctx.artifacts.get("report:template-contract"),
        space_id=ctx.config.space.space_id if Stage.SPACE in ctx.selected else None,
    )
    said = []
    for a in made:
        rec = a.meta
        label = "hub repo" if rec["repo_kind"] == "gguf" else f"hub repo ({rec['repo_kind']})"
        if rec.get("dry_run"):
            ctx.notes.setdefault("dry_run", {})["hub_push"] = True
            ctx.notes.setdefault("links", {})[f"{label} (staged, not pushed)"] = rec["staged"]
            said.append(f"would push {len(a.files)} files to {rec['repo_id']}; staged in {rec['staged']}")
        else:
            ctx.notes.setdefault("links", {})[label] = rec["url"]
            deleted = rec.get("deleted") or []
            said.append(
                f"{rec['url']}: {len(rec.get('uploaded', []))} file(s) sent, {len(rec.get('skipped', []))} unchanged"
                + (f", {len(deleted)} removed ({', '.join(deleted)})" if deleted else "")
                + ("" if rec.get("uploaded") or deleted else "; no commit")
            )
    reason = made[0].meta.get("reason") if made and made[0].meta.get("dry_run") else None
    ctx.notes.setdefault("messages", {})["hub_push"] = (f"dry run ({reason}): " if reason else "") + "; ".join(said)
    return list(made)


def run_card(ctx: RunContext) -> list[Artifact]:
    from tasks.publish.card import card_task
    from tasks.publish.hub_push import primary_kind, push_records, run_repo_ids

    ggufs = _released(ctx, "card") if "gguf" in ctx.config.hub.repos else []
    records = push_records(ctx.artifacts.values())
    repos = {a.meta["repo_kind"]: a.meta["repo_id"] for a in records if a.meta.get("repo_kind")} or run_repo_ids(
        ctx.config.hub, ctx.config.model.name, None
    )
    primary = primary_kind(list(repos))
    repo_id, endpoint = repos[primary], (records[0].meta.get("endpoint") if records else ctx.config.hub.endpoint)
    real = bool(records) and not any(a.meta.get("dry_run") for a in records) and not ctx.dry_run
    token = _hub_token(ctx, ctx.config.hub.token, "hub.token") if real else None
    made = ctx.call(
        "card",
        card_task,
        ggufs,
        _card_settings(ctx),
        ctx.run.reports_dir / "README.md",
        model_name=ctx.config.model.name,
        version=ctx.config.model.version,
        repo_id=repo_id,
        base_model=ctx.config.model.base_model,
        description=ctx.config.model.description,
        adapter=ctx.artifacts.get("adapter"),
        eval_report=ctx.artifacts.get("report:eval"),
        pushed=records if real else None,
        endpoint=endpoint,
        _token=token,
        splits=_released(ctx, "card", ArtifactKind.GGUF_SPLIT) or None,
        template_contract=ctx.artifacts.get("report:template-contract"),
        repos=repos,
        space=ctx.artifacts.get("publish:space"),
    )
    ctx.notes.setdefault("links", {})["model card"] = made.path
    ctx.notes.setdefault("messages", {})["card"] = (
        f"{made.path} ({'with' if made.meta.get('has_eval') else 'no'} eval numbers)"
        + (f"; updated on the Hub ({made.meta['commit'][:12]})" if made.meta.get("commit") else "")
    )
    return [made]


def run_space(ctx: RunContext) -> list[Artifact]:
    from tasks.publish.space import space_task

    pushed = ctx.artifacts.get("publish:hub")
    if pushed is not None and pushed.meta.get("repo_kind", "gguf") != "gguf":
        pushed = None  # the GGUF repo's record only; the merged repo's is merged_repo
    merged_repo = _merged_repo(ctx)
    if pushed is None and merged_repo is None:
        raise PermanentError(
            "the space stage needs a Hub push record (publish:hub) and this run has none",
            hint="enable hub_push, or run with --from space after a run that pushed",
        )
    ggufs = _released(ctx, "space") if pushed is not None else []  # a merged-repo template needs no GGUF
    settings, fallback = _space_settings(ctx, ggufs)
    source = merged_repo if pushed is None else pushed
    real = not source.meta.get("dry_run") and not ctx.dry_run
    token = _hub_token(ctx, ctx.config.hub.token, "hub.token") if real else None
    read_token = _hub_token(ctx, ctx.config.space.read_token, "space.read_token") if real else None
    made = ctx.call(
        "space",
        space_task,
        pushed,
        ggufs,
        settings,
        ctx.run.publish_dir,
        model_name=ctx.config.model.name,
        license=ctx.config.card.license,
        dry_run=not real,
        _token=token,
        _read_token=read_token,
        merged_repo=merged_repo,
        model_task=_model_task(ctx),
    )
    if made.meta.get("dry_run"):
        ctx.notes.setdefault("dry_run", {})["space"] = True
        ctx.notes.setdefault("links", {})["Space (staged, not deployed)"] = made.meta["staged"]
        ctx.notes.setdefault("messages", {})["space"] = (
            f"dry run ({made.meta.get('reason')}): Space folder for {made.meta['space_id']} in {made.meta['staged']}"
        )
    else:
        ctx.notes.setdefault("links", {})["Space"] = made.meta["url"]
        ctx.notes.setdefault("messages", {})["space"] = f"{made.meta['url']}: {made.meta.get('stage', 'deployed')}"
        if made.meta.get("smoke", {}).get("ok"):
            from tasks.publish.space_smoke import smoke_line

            ctx.notes["messages"]["space"] += f"; {smoke_line(made.meta['smoke'])}"
    if fallback:
        ctx.notes["messages"]["space"] += f"; {fallback}"
    return [made]


def _merged_repo(ctx: RunContext) -> Artifact | None:
    """The merged (transformers) repo's push record, when hub.repos published one."""
    for art in ctx.artifacts.values():
        if art.kind == ArtifactKind.PUBLISH and art.meta.get("repo_kind") == "merged":
            return art
    return None


def _card_settings(ctx: RunContext) -> Any:
    """card settings with the pipeline tag of the model's task when card.pipeline_tag is not set: a
    fine-tuned Whisper's cards say automatic-speech-recognition (and show the ASR pipeline)."""
    card = ctx.config.card
    if "pipeline_tag" in card.model_fields_set:
        return card
    return card.model_copy(update={"pipeline_tag": _model_task(ctx)})


def _model_task(ctx: RunContext) -> str:
    """The model's task for space.template auto: card.pipeline_tag when set explicitly, else the merged
    model's architectures (a Whisper or wav2vec2 model is speech recognition), else text generation."""
    import json

    from tasks.publish.space_templates import model_task

    card = ctx.config.card
    config = None
    merged = ctx.artifacts.get("merged")
    if merged is not None and (Path(merged.path) / "config.json").is_file():
        config = json.loads((Path(merged.path) / "config.json").read_text(encoding="utf-8"))
    return model_task(config, card.pipeline_tag if "pipeline_tag" in card.model_fields_set else None)


def _space_settings(ctx: RunContext, ggufs: list[Artifact]) -> tuple[Any, str]:
    """space settings, with the quant replaced by a released one when the gate withheld space.quant."""
    s = ctx.config.space
    shipped = [str(a.meta.get("quant")) for a in ggufs]
    gate = ctx.artifacts.get("report:gate")
    if s.quant in shipped or gate is None or s.quant not in (gate.meta.get("withheld") or {}):
        return s, ""
    pick = min(shipped, key=quant_types.display_key)  # the table's display rank: the card's best pick first
    return s.model_copy(update={"quant": pick}), f"runs {pick}: the release gate withheld space.quant {s.quant}"


def run_local_deploy(ctx: RunContext) -> list[Artifact]:
    from tasks.local.stage import local_deploy_task

    ggufs = _released(ctx, "local_deploy")
    s = ctx.config.deployment
    if not s.targets:
        raise StageSkipped("deployment.targets is empty (or every target's *_enabled switch is false)")
    made = ctx.call(
        "local_deploy",
        local_deploy_task,
        ggufs,
        s,
        ctx.config.model.name,
        ctx.run.publish_dir / "local_deploy",
        ctx.dry_run,
    )
    if ctx.dry_run:
        ctx.notes.setdefault("dry_run", {})["local_deploy"] = True
    links, parts = ctx.notes.setdefault("links", {}), []
    for a in made:
        if a.name == "local:lmstudio":
            links["LM Studio"] = a.meta["repo_dir"]
            lms = a.meta.get("lms", {})
            parts.append(
                (
                    f"LM Studio: {len(a.meta['files'])} file(s) {'would go' if ctx.dry_run else 'linked'} to "
                    f"{a.meta['repo_dir']}"
                )
                + (
                    f" (lms: {lms['skipped'].split(':')[0]})"
                    if "skipped" in lms
                    else f" (lms load rc {lms.get('load_rc')})"
                    if lms
                    else ""
                )
            )
        elif a.name == "local:ollama":
            links["Ollama Modelfile"] = a.meta["modelfile"]
            created = a.meta["create"]
            parts.append(
                f"Ollama: {a.meta['name']} created"
                if "rc" in created
                else f"Ollama: run `ollama create {a.meta['name']} -f {a.meta['modelfile']}`"
            )
    ctx.notes.setdefault("messages", {})["local_deploy"] = "; ".join(parts)
    return made


def run_template_contract(ctx: RunContext) -> list[Artifact]:
    """The chat-template contract on this run's GGUFs, merged model and local_deploy records.

    A server of this run (serve) is used for the served generation; without one the check starts its own.
    A FAIL verdict raises after the report is written (the run fails, or is degraded under continue_on_error);
    the error carries the report, so the manifest records it and the card's usage section says what was found."""
    from tasks.chat.contract import Server
    from tasks.chat.stage import deployed_key, environment_key, failure, template_contract_task

    ggufs = _need(ctx, ArtifactKind.GGUF, "template_contract")
    s = ctx.config.template_contract
    local = [a for a in ctx.of_kind(ArtifactKind.PUBLISH) if a.name.startswith("local:")]
    servers = ctx.notes.get("servers") or ctx.of_kind(ArtifactKind.SERVICE)
    server = None
    if s.served_generation and servers:
        up = servers[0]
        served = ctx.artifacts.get(f"gguf:{up.meta['quant']}")
        if served is not None:
            server = Server(up.meta["base_url"], up.meta["model_id"], served.local_path)
    report = ctx.call(
        "template_contract",
        template_contract_task,
        ggufs,
        ctx.artifacts.get("merged"),
        s,
        ctx.run.reports_dir,
        environment_key(),
        deployed_key(local),
        _local=local,
        _server=server,
    )
    ctx.notes.setdefault("links", {})["template contract"] = report.meta["markdown"]
    ctx.notes.setdefault("messages", {})["template_contract"] = f"{report.meta['verdict'].upper()}: " + "; ".join(
        report.meta["summary"]
    )
    err = failure(report) if s.fail_on_mismatch else None
    if err is not None:
        raise err
    return [report]


def run_serve(ctx: RunContext) -> list[Artifact]:
    from tasks.serve.engines import SERVE_ENGINES
    from tasks.serve.stage import serve_task

    s = ctx.config.serving
    engine = SERVE_ENGINES.lookup(s.engine)
    inputs = _need(ctx, engine.takes, "serve")  # GGUFs (llama_cpp) or merged/ (transformers)
    made = ctx.call("serve", serve_task, inputs, s, ctx.run.reports_dir)
    ctx.notes["servers"] = made
    if s.keep_running:
        engine.keep(made)
    else:  # the flow calls ctx.notes["cleanups"] at its end
        ctx.notes.setdefault("cleanups", []).append(lambda: engine.stop(made, s.stop_timeout_s))
    for a in made:
        ctx.notes.setdefault("links", {})[f"server {a.meta['quant']}"] = a.meta["base_url"]
    ctx.notes.setdefault("messages", {})["serve"] = "; ".join(
        f"{a.meta['model_id']} on {a.meta['url']} (pid {a.meta['pid']})" for a in made
    ) + ("; kept running" if s.keep_running else "; stopped at the end of the run")
    return made


def run_health(ctx: RunContext) -> list[Artifact]:
    from tasks.evaluate.health import health_task

    s = ctx.config.health_check
    if s.base_url:  # an OpenAI-compatible endpoint of the user's (LM Studio, Ollama)
        targets = [(s.base_url, s.model_id, None, None)]
    else:
        servers = ctx.notes.get("servers") or ctx.of_kind(ArtifactKind.SERVICE)
        if not servers:
            raise StageSkipped(
                "no server to check: enable the serve stage or set health_check.base_url (LM Studio: "
                "http://127.0.0.1:1234/v1, Ollama: http://127.0.0.1:11434/v1)"
            )
        # each server is checked the way its engine speaks (llama.cpp: OpenAI's API; transformers: the model API)
        targets = [
            (
                a.meta["base_url"],
                s.model_id or a.meta["model_id"],
                ctx.artifacts.get(f"gguf:{a.meta['quant']}"),
                a.meta.get("engine", "llama_cpp"),
            )
            for a in servers
        ]
    made: list[Artifact] = []
    for i, (url, model_id, gguf, engine) in enumerate(targets):
        out_dir = ctx.run.reports_dir / ("health" if i == 0 else f"health-{gguf.meta.get('quant') if gguf else i}")
        report = ctx.call("health", health_task, s, out_dir, url, model_id, gguf, engine)
        if i:
            report = report.model_copy(update={"name": f"report:health:{gguf.meta.get('quant') if gguf else i}"})
        made.append(report)
    ctx.notes.setdefault("links", {})["health report"] = str(ctx.run.reports_dir / "health" / "health.md")
    ctx.notes.setdefault("messages", {})["health"] = "; ".join(
        f"{a.meta['model_id']}: {a.meta['verdict']}" + (f" ({a.meta['reasons'][0]})" if a.meta["reasons"] else "")
        for a in made
    )
    bad = [a for a in made if a.meta["verdict"] == HealthVerdict.UNHEALTHY]
    if bad and s.fail_on_unhealthy:
        raise PermanentError(
            f"{bad[0].meta['model_id']} at {bad[0].meta['base_url']} is unhealthy: {'; '.join(bad[0].meta['reasons'])}",
            hint=f"see {bad[0].path}/health.md; set health_check.fail_on_unhealthy: false to only report it",
        )
    return made


def run_evaluate(ctx: RunContext) -> list[Artifact]:
    from tasks.evaluate.evaluation import data_digest, evaluate_task
    from tasks.evaluate.speech import SPEECH_TASK

    s = ctx.config.evaluation
    if _model_task(ctx) == SPEECH_TASK:  # no GGUF to compare: the merged model's word error rate
        return _run_speech_evaluate(ctx)
    ggufs = _need(ctx, ArtifactKind.GGUF, "evaluate")
    report = ctx.call(
        "evaluate", evaluate_task, ggufs, s, ctx.run.reports_dir / "eval", ctx.config.model.name, data_digest(s)
    )
    ctx.notes.setdefault("links", {})["eval report"] = report.meta["markdown"]
    rows = report.meta["quants"]
    ctx.notes.setdefault("messages", {})["evaluate"] = "; ".join(
        f"{q}: ppl {r['ppl']:.4g}"
        + (
            f", KL {r['kl_div']:.2g}"
            if r.get("kl_div") is not None and q != report.meta.get("reference", "F16")
            else ""
        )
        for q, r in rows.items()
        if r.get("ppl") is not None
    )
    return [report]


def _run_speech_evaluate(ctx: RunContext) -> list[Artifact]:
    from tasks.evaluate.speech import data_digest, evaluate_speech_task

    s = ctx.config.evaluation
    if not s.samples:
        raise StageSkipped(
            "a speech model is scored on recordings with transcripts: set evaluation.samples to a JSONL file of "
            '{"audio": "<wav path or base64>", "reference": "<transcript>"}'
        )
    merged = _need(ctx, ArtifactKind.MERGED, "evaluate")[0]
    report = ctx.call(
        "evaluate",
        evaluate_speech_task,
        merged,
        s,
        ctx.run.reports_dir / "eval",
        ctx.config.model.name,
        data_digest(s),
    )
    row = report.meta["quants"]["merged"]
    ctx.notes.setdefault("links", {})["eval report"] = report.meta["markdown"]
    ctx.notes.setdefault("messages", {})["evaluate"] = (
        f"merged: WER {row['wer']:.4g}, CER {row['cer']:.4g} on {report.meta['samples']} recording(s)"
    )
    return [report]


# --- lineage: what a stage that does not run still wants of its recorded artifacts (the rows' `keep`) ----


def keep_merged(a: Artifact, config: Any, lineage: Lineage) -> str | None:
    """merged/ is current when made from the current adapter (checked by the lineage) and the same base."""
    from tasks.merge.stage import base_fingerprint

    adapter = lineage.artifacts.get("adapter")
    if "base" not in a.inputs or adapter is None:
        return None  # a record without the base's fingerprint: nothing to compare (the adapter input is checked)
    try:
        now = base_fingerprint(config.merge, config.model.base_model, adapter)
    except Exception:  # the base cannot be looked at now (not cached, moved): keep what the user chose to reuse
        return None
    if a.inputs["base"] != now:
        return "merged from another base model (its files changed, or merge.base_model names another)"
    return None


def keep_converted(a: Artifact, config: Any, lineage: Lineage) -> str | None:
    if a.kind == ArtifactKind.GGUF_LORA:
        return None if config.convert.lora_adapter else "convert.lora_adapter is off"
    want = config.convert.outtype.upper()
    return None if str(a.meta.get("quant")).upper() == want else f"convert.outtype is {config.convert.outtype} now"


def keep_quantized(a: Artifact, config: Any, lineage: Lineage) -> str | None:
    q = str(a.meta.get("quant") or "").upper()
    types = {t.upper() for t in config.quantization.types}
    if a.kind == ArtifactKind.GGUF_SPLIT:
        if not config.quantization.split_max_size:
            return "quantization.split_max_size is not set"
        if q == config.convert.outtype.upper() and not config.pipeline.cleanup.delete_f16:
            return None
    return None if q in types else f"quantization.types no longer lists {q}"


def keep_served(a: Artifact, config: Any, lineage: Lineage) -> str | None:
    wanted = [config.serving.quant, *config.serving.extra_quants]
    q = str(a.meta.get("quant"))
    return None if q in wanted else f"serving.quant/extra_quants no longer serve {q}"


def __getattr__(name: str) -> object:
    """`flows.runners.RUNNERS` still works: the runner table now lives in the stage table (flows/stages.py)."""
    if name == "RUNNERS":
        from flows.stages import RUNNERS

        return RUNNERS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
