"""The full pipeline as one Prefect flow, and its command line: `python -m flows.full`.

The stages and their order come from the stage table (flows/stages.py): download -> merge -> convert ->
quantize (parallel) -> serve -> health -> evaluate -> LM Studio/Ollama -> hub push -> card -> Space, so
the card in the Hub commit carries the evaluation. With no arguments it runs the built-in demo (no
network, token or GPU).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from flows.env import prepare_environment

prepare_environment()

from prefect import flow, get_run_logger  # noqa: E402

from flows.cleanup import cleanup_intermediates  # noqa: E402
from flows.config import load_config, parse_config  # noqa: E402
from flows.context import RunContext  # noqa: E402
from flows.dag import StageResult, run_graph  # noqa: E402
from flows.notifications import notify_run, release_lines  # noqa: E402
from flows.orchestration import (  # noqa: E402
    apply_log_level,
    ensure_concurrency_limit,
    publish_summary_markdown,
    stage_slot,
    tag_current_flow_run,
)  # noqa: E402
from flows.stages import CRITICAL_STAGES, HEAVY_STAGES, RUNNERS, SPECS, STAGES, TABLE, descendants  # noqa: E402
from flows.summary import RunSummary, StageOutcome  # noqa: E402
from tasks.core.errors import ConfigError, PipelineError, StageSkipped  # noqa: E402
from tasks.core.hashing import digest_of  # noqa: E402
from tasks.core.lineage import Lineage  # noqa: E402
from tasks.core.run import RunFolder, manifest_table  # noqa: E402
from tasks.core.runlock import RUN_FOLDER_HOOKS, open_run_folder  # noqa: E402
from tasks.core.runlog import RUN_LOG_HOOKS, current_run_logs, open_run_logs, stage_context, stage_failed  # noqa: E402
from tasks.core.scrub import scrub  # noqa: E402
from tasks.core.ui import artifact_key, publish_table  # noqa: E402
from tasks.core.vocab import Stage, StageStatus  # noqa: E402


def select_stages(
    enabled: list[str], only: list[str] | None = None, skip: list[str] | None = None, from_stage: str | None = None
) -> list[Stage]:
    """The stages to run, in the table's order, from the config's list and the --only/--skip/--from options.

    An implied stage (the release gate) runs whenever one of its dependants runs, whatever the lists say."""
    for name, values in (
        ("--only", only or []),
        ("--skip", skip or []),
        ("--from", [from_stage] if from_stage else []),
    ):
        for v in values:
            if v not in STAGES:
                raise ConfigError(f"{name} {v!r} is not a stage; stages are: {', '.join(STAGES)}")
    for v in skip or []:
        if SPECS[Stage(v)].implied:
            raise ConfigError(
                f"--skip {v}: the {v} stage runs whenever a stage after it runs",
                hint="to let every quantization ship, leave pipeline.gate and pipeline.approval unset",
            )
    chosen = [s for s in STAGES if s in enabled]
    if from_stage:
        chosen = [s for s in chosen if STAGES.index(s) >= STAGES.index(from_stage)]
    if only:
        chosen = [s for s in chosen if s in only]
    if skip:
        chosen = [s for s in chosen if s not in skip]
    implied = {s.name for s in TABLE if s.implied and any(d in chosen for d in descendants(s.name))}
    return [s for s in STAGES if s in chosen or s in implied]


def notify_setup_failure(config: dict[str, Any] | None, config_path: str | None, exc: BaseException) -> dict[str, str]:
    """Send the failure of a run that never reached its first stage (bad config, unwritable run folder).

    The config may be what is broken, so its `notifications` and `model` sections are read on their own:
    a typo in another section must not silence the message about it. Best effort, like every notification.
    """
    from flows.config import NotificationSettings, read_config_data

    try:
        data = config if config is not None else read_config_data(config_path) if config_path else {}
        settings = NotificationSettings.model_validate(data.get("notifications") or {})
        model = data.get("model") or {}
    except Exception:  # pragma: no cover - the notifications section itself is unreadable: nobody to tell
        return {}
    summary = RunSummary(
        model=str(model.get("name") or "?"),
        version=str(model.get("version") or "?"),
        run_dir="",
        manifest=str(config_path or "(inline config)"),
    )
    return notify_run(settings, summary, failed=True, error=f"before the first stage: {type(exc).__name__}: {exc}")


# the hooks release the run folder and close the run's log files, however the run ends
_HOOKS = {hook: RUN_FOLDER_HOOKS[hook] + RUN_LOG_HOOKS[hook] for hook in RUN_FOLDER_HOOKS}


@flow(name="loraship-full", log_prints=True, **_HOOKS)
def full(
    config: dict[str, Any] | None = None,
    config_path: str | None = None,
    only: list[str] | None = None,
    skip: list[str] | None = None,
    from_stage: str | None = None,
    dry_run: bool = False,
    refresh: list[str] | None = None,
) -> RunSummary:
    """Run the pipeline for one model. Pass `config_path` (a deployment_config.yaml) or `config` (its contents)."""
    logger = get_run_logger()
    try:
        if config_path:
            cfg = load_config(config_path)
        elif config is not None:
            cfg = parse_config(config)
        else:
            raise ConfigError(
                "the flow needs config_path or config", hint="python -m flows.full --config deployment_config.yaml"
            )
        stages = select_stages(cfg.pipeline.stages, only, skip, from_stage)
        apply_log_level(cfg.logging.level)
        run = RunFolder.for_model(cfg.pipeline.runs_dir, cfg.model.name, cfg.model.version).ensure()
        open_run_folder(run)  # one run per run folder: locked, cleared of a killed run's leftovers
        logs = open_run_logs(cfg.logging, run.root, cfg.model.name, cfg.model.version)  # after retention
        run.set_config_digest(digest_of(cfg))
        previous = run.load_manifest()
        ctx = RunContext(
            config=cfg,
            run=run,
            dry_run=dry_run,
            refresh=set(refresh or []),
            lineage=Lineage(removed=dict(previous.removed)),
            records={**{n: s.artifact for n, s in previous.superseded.items()}, **previous.artifacts},
            selected=tuple(stages),
        )
        summary = RunSummary(
            model=cfg.model.name,
            version=cfg.model.version,
            run_dir=str(run.root),
            manifest=str(run.manifest_path),
            log_dir=str(logs.dir),
            logs_removed=len(logs.removed.runs),
        )
        logger.info("run folder %s; stages: %s", run.root, ", ".join(stages) or "(none)")
        tag_current_flow_run(cfg)
        if any(s in HEAVY_STAGES for s in stages):
            ensure_concurrency_limit(cfg)
    except Exception as exc:  # nothing ran yet: still tell whoever waits for this run that it failed
        notify_setup_failure(config, config_path, exc)
        raise

    def settled(res: StageResult) -> None:
        _settled(ctx, summary, res, logger)

    try:
        results = run_graph(
            ctx,
            stages,
            execute_stage,
            lambda stage: carry_stage(ctx, stage),
            settled,
            max_parallel=cfg.pipeline.max_parallel_stages,
        )
    except BaseException:  # the graph itself broke (or Ctrl-C): still stop what the stages started
        _run_cleanups(ctx)
        raise
    summary.stages.sort(key=lambda o: STAGES.index(Stage(o.stage)))
    superseded = _supersede(ctx, results)
    fatal = next((r for r in results.values() if r.fatal), None)
    if fatal is not None:
        summary.links.update(ctx.notes.get("links", {}))
        notify_run(cfg.notifications, summary, failed=True, error=f"{fatal.stage}: {fatal.message}")
        _run_cleanups(ctx)
        publish_summary_markdown(summary, artifact_key(summary.model))  # links the failed stage's log
        _write_summary_log(summary)
        raise fatal.error
    _run_cleanups(ctx)
    removed = cleanup_intermediates(cfg, ctx.lineage.artifacts)
    if cfg.pipeline.cleanup.delete_superseded:
        removed += _delete_superseded(ctx, superseded)
    if removed:
        ctx.notes.setdefault("links", {})["cleaned up"] = ", ".join(removed)
    run.prune_missing()  # intermediates deleted by pipeline.cleanup leave the artifact list
    manifest = run.load_manifest()
    summary.artifacts = manifest_table(manifest)
    summary.superseded = {n: s.reason for n, s in manifest.superseded.items() if n in superseded}
    summary.gate = ctx.notes.get("gate")
    summary.links.update(ctx.notes.get("links", {}))
    _publish_summary_artifacts(summary)
    notify_run(cfg.notifications, summary)
    _write_summary_log(summary)
    return summary


def execute_stage(ctx: RunContext, stage: Stage) -> StageResult:
    """Run one stage's runner (inside the stage's Prefect task) and say what happened.

    Whatever wraps every stage goes here: the heavy-stage concurrency slot now. The runner is looked up
    when the stage runs (tests replace one entry of RUNNERS to stand in for a broken stage).
    """
    cfg = ctx.config
    started_at, t0 = time.time(), time.monotonic()
    try:
        with stage_context(stage), stage_slot(cfg, stage):  # the stage's records go to logs/<stage>.log
            made = RUNNERS[stage](ctx)
    except StageSkipped as why:  # nothing to do: its dependants run on what the lineage has (unless it blocks)
        return StageResult(
            stage,
            StageStatus.SKIPPED,
            time.monotonic() - t0,
            str(why),
            blocks=ctx.notes.get("blocks", {}).get(stage),
            started_at=started_at,
            ended_at=time.time(),
        )
    except Exception as exc:
        message = scrub(f"{type(exc).__name__}: {exc}")
        fatal = stage in CRITICAL_STAGES or not cfg.pipeline.continue_on_error
        log_path = stage_failed(stage, exc)  # its error and traceback in logs/<stage>.log
        if log_path is not None:
            ctx.notes.setdefault("links", {})[f"log of {stage}"] = str(log_path)
        return StageResult(
            stage,
            StageStatus.FAILED if fatal else StageStatus.DEGRADED,
            time.monotonic() - t0,
            message,
            list(getattr(exc, "artifacts", None) or []),  # FailedWithReport: the report that says why
            blocks=f"failed ({message})",
            error=exc,
            fatal=fatal,
            started_at=started_at,
            ended_at=time.time(),
        )
    status = (
        StageStatus.DRY_RUN
        if ctx.notes.get("dry_run", {}).get(stage)
        else (StageStatus.CACHED if ctx.all_cached(stage) else StageStatus.DONE)
    )
    message = ctx.notes.get("messages", {}).get(stage, "")
    ran_on = ctx.notes.get("task_runner", {}).get(stage)
    if ran_on and ran_on["runner"] != "ThreadPoolTaskRunner":
        message += f"{'; ' if message else ''}{_runner_phrase(ran_on)}"
    return StageResult(
        stage,
        status,
        time.monotonic() - t0,
        message,
        list(made),
        blocks=ctx.notes.get("blocks", {}).get(stage),
        started_at=started_at,
        ended_at=time.time(),
    )


def carry_stage(ctx: RunContext, stage: Stage) -> StageResult:
    """Settle a stage that does not run this time: its recorded artifacts that are still current join the
    lineage (tasks/core/lineage.py); when it had records and none is current, it is superseded."""
    spec = SPECS[stage]
    kept, dropped = ctx.lineage.carry(stage, ctx.records, ctx.config, spec.keep, spec.keep_inputs)
    message = "; ".join(f"{n}: {why}" for n, why in dropped.items())
    status = StageStatus.SUPERSEDED if dropped and not kept else None
    return StageResult(stage, status, message=message, artifacts=kept)


def _settled(ctx: RunContext, summary: RunSummary, res: StageResult, logger: Any) -> None:
    """In the flow thread, as each stage settles: the lineage, the manifest, the summary, the log."""
    run, stage = ctx.run, res.stage
    if res.status is None or res.status == StageStatus.SUPERSEDED:  # not run: carried from the manifest
        run.restore(res.artifacts)
        if res.status == StageStatus.SUPERSEDED:
            run.record(stage, res.status, message=res.message)
            logger.info("%s: not run; its earlier artifacts are superseded (%s)", stage, res.message)
        return
    ctx.lineage.adopt(res.artifacts)
    run.record(stage, res.status, res.artifacts, seconds=res.seconds, message=res.message)
    ran_on = ctx.notes.get("task_runner", {}).get(stage)
    if ran_on:
        summary.task_runners[stage] = ran_on
    summary.stages.append(
        StageOutcome(
            stage=stage,
            status=res.status,
            seconds=round(res.seconds, 2),
            message=res.message,
            artifacts=[a.name for a in res.artifacts],
            started_at=res.started_at or None,
            ended_at=res.ended_at or None,
        )
    )
    if res.status == StageStatus.DEGRADED:
        summary.degraded = True
        logger.warning("%s failed, continuing (pipeline.continue_on_error): %s", stage, res.message)
    elif res.status == StageStatus.FAILED:
        logger.error("%s failed: %s", stage, res.message)
    elif res.status == StageStatus.SKIPPED:
        logger.info("%s: skipped (%s)", stage, res.message)
    else:
        names = ", ".join(a.name for a in res.artifacts) or "no artifacts"
        logger.info("%s: %s in %.1fs (%s)", stage, res.status, res.seconds, names)


def _supersede(ctx: RunContext, results: dict[Stage, StageResult]) -> dict[str, str]:
    """Mark superseded every recorded artifact of a settled stage that is not in this run's lineage."""
    current = ctx.lineage.artifacts
    reasons: dict[str, str] = {}
    for name, a in ctx.records.items():
        if name in current or a.stage not in results:
            continue
        stage = Stage(a.stage)
        why = ctx.lineage.superseded.get(name)
        keep = SPECS[stage].keep
        if why is None and keep is not None:
            why = keep(a, ctx.config, ctx.lineage)
        res = results[stage]
        reasons[name] = why or (
            f"{stage} ran and did not make it again"
            if res.status is not None and res.status.ok
            else f"not made in this run ({stage}: {res.status or 'not run'})"
        )
    ctx.run.supersede(reasons)
    return reasons


def _delete_superseded(ctx: RunContext, superseded: dict[str, str]) -> list[str]:
    """pipeline.cleanup.delete_superseded: remove the files of superseded artifacts inside the run folder
    that no current artifact uses (their records stay in the manifest)."""
    import shutil

    in_use = {Path(a.path) for a in ctx.lineage.artifacts.values()}
    removed: list[str] = []
    for name in superseded:
        p = Path(ctx.records[name].path)
        if p in in_use or not p.is_relative_to(ctx.run.root) or not p.exists():
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(str(p))
    return removed


def _write_summary_log(summary: RunSummary) -> None:
    """The stage table printed at the end of a run, also in logs/summary.log (appended per run)."""
    logs = current_run_logs()
    if logs is not None:
        logs.write_summary(format_summary(summary))


def _run_cleanups(ctx: RunContext) -> None:
    """Call what stages registered in ctx.notes["cleanups"] (e.g. stop the servers of the serve stage)."""
    for fn in ctx.notes.pop("cleanups", []):
        try:
            fn()
        except Exception as exc:  # a failed cleanup must not hide the run's outcome
            logging.getLogger("loraship").warning("cleanup failed: %s", exc)


def _publish_summary_artifacts(summary: RunSummary) -> None:
    """The manifest as a table and the summary as markdown in the Prefect UI (best effort: tasks/core/ui.py)."""
    description = f"Artifacts of {summary.model} {summary.version}: {summary.manifest}"
    publish_table(artifact_key("manifest", summary.model), summary.artifacts or [{"artifact": "(none)"}], description)
    publish_summary_markdown(summary, artifact_key(summary.model))


def _runner_phrase(info: dict[str, Any]) -> str:
    """E.g. 'on DaskTaskRunner (LocalCluster, processes, 2 workers)' for the stage message."""
    parts = [info.get("cluster") or info.get("scheduler") or ""]
    if "processes" in info:
        parts.append("processes" if info["processes"] else "threads")
    if info.get("workers"):
        parts.append(f"{len(info['workers'])} worker(s)")
    detail = ", ".join(p for p in parts if p)
    return f"on {info['runner']}" + (f" ({detail})" if detail else "")


def format_summary(summary: RunSummary) -> str:
    lines = [
        f"\n{summary.model} {summary.version}: {'DEGRADED' if summary.degraded else 'ok'}",
        f"run folder: {summary.run_dir}",
        "",
        "stages:",
    ]
    for s in summary.stages:
        lines.append(f"  {s.stage:<13} {s.status:<9} {s.seconds:7.1f}s  {s.message}")
    if summary.artifacts:
        lines += ["", "artifacts:"]
        for a in summary.artifacts:
            lines.append(f"  {a['artifact']:<22} {a['size_mb']:>10.2f} MB  sha256 {a['sha256']}…  {a['path']}")
    lines += [f"  {line}" if line else line for line in release_lines(summary)]
    if summary.links:
        lines += ["", "links:"] + [f"  {k}: {v}" for k, v in summary.links.items()]
    if summary.log_dir:
        n = summary.logs_removed
        lines += ["", f"logs: {summary.log_dir}" + (f" (retention removed the logs of {n} older run(s))" if n else "")]
    lines += [
        "",
        f"manifest: {summary.manifest}",
        (
            "Prefect UI: run `prefect server start` and open http://127.0.0.1:4200 (set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api before the run to see it there)"
        ),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.full",
        description=(
            "Take a LoRA fine-tune to usable models: download, merge, convert to GGUF, quantize in parallel, "
            "publish to the Hub with a card and a demo Space, link into LM Studio/Ollama, serve, health-check "
            "and evaluate. With no --config it runs the built-in demo: a tiny model and a LoRA adapter trained "
            "here for a few seconds (no network, token or GPU needed); stages that need credentials run as a "
            "dry run and show what they would upload."
        ),
        epilog=(
            f"stages, in order: {', '.join(STAGES)}. Critical stages ({', '.join(sorted(CRITICAL_STAGES))}) "
            "always fail the run; the others can be allowed to fail with pipeline.continue_on_error."
        ),
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="deployment_config.yaml (see deployments/deployment_config.example.yaml); default: the built-in demo",
    )
    p.add_argument(
        "--only",
        metavar="STAGE",
        nargs="+",
        help="run only these stages (earlier artifacts are taken from the run folder's manifest)",
    )
    p.add_argument("--skip", metavar="STAGE", nargs="+", help="skip these stages")
    p.add_argument(
        "--from", dest="from_stage", metavar="STAGE", help="start at this stage, reusing the earlier stages' artifacts"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="stages that publish or install write exactly what they would send, and send nothing",
    )
    p.add_argument(
        "--refresh", metavar="STAGE", nargs="*", help="ignore the cache for these stages (no name: all stages)"
    )
    p.add_argument("--runs-dir", metavar="DIR", help="override pipeline.runs_dir")
    p.add_argument("--validate", action="store_true", help="only validate the config and print it; run nothing")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = None
    try:
        if args.config:
            cfg = load_config(args.config)
        else:
            from flows.demo import demo_config

            print(
                "No --config given: running the built-in demo (a tiny model and a LoRA adapter built on this machine).",
                flush=True,
            )
            cfg = demo_config(validate_only=args.validate, runs_dir=args.runs_dir or "runs")
        if args.runs_dir:
            cfg.pipeline.runs_dir = args.runs_dir
        select_stages(cfg.pipeline.stages, args.only, args.skip, args.from_stage)
        if args.validate:
            print(cfg.model_dump_json(indent=2))
            print("config is valid", file=sys.stderr)
            return 0
        refresh = None if args.refresh is None else (args.refresh or ["all"])
        from prefect import tags

        from flows.orchestration import run_tags
        from flows.task_runners import configured_flow

        with tags(*run_tags(cfg)):
            summary = configured_flow(full, cfg)(
                config=cfg.model_dump(mode="json"),
                only=args.only,
                skip=args.skip,
                from_stage=args.from_stage,
                dry_run=args.dry_run,
                refresh=refresh,
            )
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        _point_at_logs(cfg)
        return 2
    except Exception:
        _point_at_logs(cfg)
        raise
    print(summary.model_dump_json(indent=2) if args.json else format_summary(summary))
    return 0


def _point_at_logs(cfg: Any) -> None:
    """After a failed run on the command line: where its log files are (the failed stage's is linked in
    summary.log)."""
    if cfg is None:
        return
    from tasks.core.runlog import SUMMARY_LOG, log_dir_for

    folder = log_dir_for(cfg.logging, cfg.run_dir().resolve(), cfg.model.name, cfg.model.version)
    if (folder / SUMMARY_LOG).is_file():
        print(f"run logs: {folder} ({SUMMARY_LOG} links the failed stage's log)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
