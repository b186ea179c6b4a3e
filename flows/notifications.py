"""Telling people about a run: completion, failure, degraded health, through saved Prefect notification blocks.

The blocks are Prefect's own (SlackWebhook, DiscordWebhook, MicrosoftTeamsWebhook, SendgridEmail,
CustomWebhookNotificationBlock, ...): loraship composes the message and hands it to `block.notify`; it
does not talk to any webhook itself. The config names blocks per event (`notifications.on_failure:
[slack-webhook/ml-team]`). Sending is best effort: a missing block or an unreachable receiver is
logged as a warning and never changes the run's result.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Literal

from tasks.core.scrub import scrub
from tasks.core.vocab import StageStatus
from tasks.release.gate import Decision

if TYPE_CHECKING:
    from flows.config import NotificationSettings
    from flows.summary import RunSummary

log = logging.getLogger("loraship.notifications")

Event = Literal["completed", "degraded", "failed"]


def _redacted(exc: BaseException) -> str:
    """An error without URLs in it: a webhook URL is a secret (Slack, Discord, Teams put the key in it)."""
    return f"{type(exc).__name__}: " + scrub(exc, urls=True)[:300]


def events_for(summary: RunSummary, failed: bool) -> list[Event]:
    """Which configured lists a run's outcome goes to: failed, or completed (+ degraded when degraded)."""
    if failed:
        return ["failed"]
    return ["completed", "degraded"] if summary.degraded else ["completed"]


def blocks_for(settings: NotificationSettings, event: Event) -> list[str]:
    return {"completed": settings.on_completion, "degraded": settings.on_degraded, "failed": settings.on_failure}[event]


def flow_run_url(settings: NotificationSettings) -> str:
    """The UI page of the current flow run, when there is a UI to link to."""
    try:
        from prefect.runtime import flow_run

        run_id = flow_run.id
    except Exception:  # pragma: no cover - outside a flow run
        return ""
    if not run_id:
        return ""
    base = settings.ui_url or os.environ.get("PREFECT_UI_URL", "")
    if not base:
        api = os.environ.get("PREFECT_API_URL", "")
        base = api[: -len("/api")] if api.endswith("/api") else ""
    return f"{base.rstrip('/')}/runs/flow-run/{run_id}" if base else ""


def compose(summary: RunSummary, event: Event, error: str = "", run_url: str = "") -> tuple[str, str]:
    """(subject, body) of the message: outcome, stages, links to the Hub repo, Space, reports and the run."""
    word = (
        "FAILED"
        if event == "failed"
        else ("completed DEGRADED" if summary.degraded or event == "degraded" else "completed")
    )
    subject = f"loraship: {summary.model} {summary.version} {word}"
    lines = [subject, ""]
    if error:
        lines += [f"error: {error}", ""]
    for s in summary.stages:
        lines.append(
            f"- {s.stage}: {s.status}" + (f" ({s.message})" if s.message and s.status != StageStatus.DONE else "")
        )
    lines += release_lines(summary)
    links = dict(summary.links)
    if run_url:
        links["prefect run"] = run_url
    links.setdefault("manifest", summary.manifest)
    lines.append("")
    lines += [f"{k}: {v}" for k, v in links.items()]
    return scrub(subject), scrub("\n".join(lines))


def release_lines(summary: RunSummary) -> list[str]:
    """What the release gate decided and what left the lineage (the summary, the UI and every message)."""
    lines = []
    if summary.gate:
        lines.append(f"release gate: {Decision.model_validate(summary.gate).summary()}")
    if summary.superseded:
        lines.append("superseded: " + "; ".join(f"{n} ({why})" for n, why in summary.superseded.items()))
    return [""] + lines if lines else []


def load_notification_block(name: str) -> Any:
    """A saved notification block by `type-slug/name`, or by bare name among saved notification blocks."""
    from prefect.blocks.core import Block

    if "/" in name:
        return Block.load(name)
    from prefect.client.orchestration import get_client

    docs = []
    with get_client(sync_client=True) as client:
        offset = 0
        while True:  # the client offers no filter by name here: page through the saved blocks
            page = client.read_block_documents(offset=offset, limit=200, include_secrets=False)
            docs += [
                d for d in page if d.name == name and d.block_schema and "notify" in (d.block_schema.capabilities or [])
            ]
            if len(page) < 200:
                break
            offset += 200
    if not docs:
        raise ValueError(
            f"no saved notification block named {name!r} (save one in the Prefect UI under Blocks, or name "
            "it as type-slug/name)"
        )
    if len(docs) > 1:
        raise ValueError(
            f"several notification blocks are named {name!r}: write it as type-slug/name, e.g. "
            f"{docs[0].block_type.slug}/{name}"
        )
    return Block.load(f"{docs[0].block_type.slug}/{name}")


def notify_run(
    settings: NotificationSettings, summary: RunSummary, failed: bool = False, error: str = ""
) -> dict[str, str]:
    """Send the run's outcome to every block configured for it. Returns {block name: 'sent' | why not}."""
    results: dict[str, str] = {}
    run_url = ""
    for event in events_for(summary, failed):
        names = blocks_for(settings, event)
        if not names:
            continue
        run_url = run_url or flow_run_url(settings)
        subject, body = compose(summary, event, error=error, run_url=run_url)
        for name in names:
            key = f"{event}:{name}"
            try:
                block = load_notification_block(name)
                block.notify(body=body, subject=subject)
                results[key] = "sent"
                log.info("notified %s (%s)", name, event)
            except Exception as exc:  # best effort: a notification never fails the run
                results[key] = _redacted(exc)
                log.warning("notification %s (%s) not sent: %s", name, event, results[key])
    return results
