"""Prefect UI artifacts (markdown, tables, progress), best effort, in one place.

The UI is a nicety: a run's result never depends on it. So every helper here does nothing outside a Prefect
run (plain stage functions stay callable and testable without Prefect), and logs at debug level instead of
raising when the API refuses or is unreachable. Keys are made valid here (Prefect accepts lower-case
letters, digits and dashes), so callers pass any model name.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("loraship.ui")


def artifact_key(*parts: str) -> str:
    """A valid Prefect artifact key from free text: `artifact_key("eval", "My Model_v2")` is `eval-my-model-v2`."""
    text = "-".join(p for p in parts if p)
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "model"


def in_prefect_run() -> bool:
    """Whether this code runs inside a Prefect flow or task run (where artifacts have somewhere to go).

    A process that has not imported Prefect's run context is in no run: answering that without importing Prefect
    (~2-3 s) keeps a stage's plain function, run outside a flow (a benchmark, `python -m tasks...`), from paying it
    in the middle of its work (the convert stage's progress bar did, before its converter started)."""
    if "prefect.context" not in sys.modules:
        return False
    try:
        from prefect.context import FlowRunContext, TaskRunContext

        return TaskRunContext.get() is not None or FlowRunContext.get() is not None
    except Exception:
        return False


def publish_markdown(key: str, markdown: str, description: str) -> None:
    """A markdown artifact under `key` (made valid), or nothing outside a run or when the API refuses."""
    if not in_prefect_run():
        return
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key=artifact_key(key), markdown=markdown, description=description)
    except Exception as exc:
        log.debug("no markdown artifact %s: %s", key, exc)


def publish_table(key: str, table: list[dict[str, Any]], description: str) -> None:
    """A table artifact (one dict per row) under `key` (made valid); best effort as above."""
    if not in_prefect_run():
        return
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(key=artifact_key(key), table=table, description=description)
    except Exception as exc:
        log.debug("no table artifact %s: %s", key, exc)


def create_progress(description: str) -> Any:
    """A progress artifact at 0% (its id, for `update_progress`), or None outside a run or on failure."""
    if not in_prefect_run():
        return None
    try:
        from prefect.artifacts import create_progress_artifact

        return create_progress_artifact(progress=0.0, description=description)
    except Exception as exc:
        log.debug("no progress artifact: %s", exc)
        return None


def update_progress(artifact_id: Any, percent: float) -> None:
    try:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(artifact_id=artifact_id, progress=percent)
    except Exception as exc:
        log.debug("progress update failed: %s", exc)
