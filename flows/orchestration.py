"""Run-level Prefect plumbing around the pipeline: tags, the heavy-stage concurrency limit, the task
runner choice, the run summary as a markdown artifact (cleanup of intermediates: flows/cleanup.py).

All of it is Prefect's own machinery (tags, global concurrency limits, task runners, artifacts); this
module only decides names and when to use them. None of it may fail a run that otherwise succeeded,
except a task runner that was asked for and cannot be made (that is a configuration error).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from flows.notifications import release_lines
from flows.stages import HEAVY_STAGES
from flows.summary import RunSummary
from tasks.core.ui import artifact_key, publish_markdown

if TYPE_CHECKING:
    from flows.config import PipelineConfig

log = logging.getLogger("loraship.orchestration")


def run_tags(cfg: PipelineConfig) -> list[str]:
    return [f"model:{cfg.model.name}", f"version:{cfg.model.version}", "loraship"]


def tag_current_flow_run(cfg: PipelineConfig) -> list[str]:
    """Add model/version tags to the running flow run (a UI filter); best effort."""
    wanted = run_tags(cfg)
    try:
        from prefect.client.orchestration import get_client
        from prefect.runtime import flow_run

        if not flow_run.id:
            return []
        tags = sorted(set(flow_run.tags or []) | set(wanted))
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, tags=tags)
        return tags
    except Exception as exc:  # pragma: no cover - UI nicety
        log.debug("flow run not tagged: %s", exc)
        return []


def ensure_concurrency_limit(cfg: PipelineConfig) -> None:
    """Create (or resize) the heavy-stage limit when `performance.concurrency_slots` asks for it."""
    perf = cfg.performance
    if not perf.concurrency_limit or not perf.concurrency_slots:
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(perf.concurrency_limit, perf.concurrency_slots)
    log.info("global concurrency limit %r: %d slot(s)", perf.concurrency_limit, perf.concurrency_slots)


@contextlib.contextmanager
def stage_slot(cfg: PipelineConfig, stage: str) -> Iterator[None]:
    """Hold one slot of the heavy-stage limit while a heavy stage runs.

    Non-strict: when no limit of that name exists the stage runs at once (nothing to wait for), so a
    fresh server never hangs a run. Create it with `prefect gcl create loraship-heavy --limit 1` or
    `performance.concurrency_slots`.
    """
    name = cfg.performance.concurrency_limit
    if stage not in HEAVY_STAGES or not name:
        yield
        return
    if not _limit_exists(name):
        log.info(
            "%s: no global concurrency limit %r, not limited (create it: prefect gcl create %s --limit 1)",
            stage,
            name,
            name,
        )
        yield
        return
    from prefect.concurrency.sync import concurrency

    # The lease outlives a long merge: renewed in the background; a failed renewal must not kill it.
    with concurrency(name, occupy=1, strict=False, lease_duration=600, raise_on_lease_renewal_failure=False):
        yield


def _limit_exists(name: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(name)
        return True
    except ObjectNotFound:
        return False


def apply_log_level(level: str) -> None:
    """`logging.level` for the project's loggers (Prefect's root logger stays at WARNING for libraries)."""
    logging.getLogger("loraship").setLevel(level)


def summary_markdown(summary: RunSummary) -> str:
    state = "DEGRADED" if summary.degraded else "ok"
    lines = [
        f"# {summary.model} {summary.version}: {state}",
        "",
        "| stage | status | seconds | message |",
        "| --- | --- | ---: | --- |",
    ]
    for s in summary.stages:
        msg = s.message.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {s.stage} | {s.status} | {s.seconds:.1f} | {msg} |")
    lines += release_lines(summary)
    if summary.links:
        lines += ["", "## Links", ""] + [f"- **{k}**: {v}" for k, v in summary.links.items()]
    lines += ["", f"Run folder: `{summary.run_dir}`  ", f"Manifest: `{summary.manifest}`"]
    return "\n".join(lines)


def publish_summary_markdown(summary: RunSummary, key: str) -> None:
    """The run summary (stages, links) as a markdown artifact in the Prefect UI; best effort."""
    description = f"loraship run summary of {summary.model} {summary.version}"
    publish_markdown(artifact_key("summary", key), summary_markdown(summary), description)
