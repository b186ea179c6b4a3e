"""The best-effort Prefect UI artifacts (tasks/core/ui.py): nothing outside a run, real artifacts inside one."""

from __future__ import annotations

import logging

import pytest

from tasks.core.ui import artifact_key, create_progress, in_prefect_run, publish_markdown, publish_table


def test_keys_are_made_valid():
    assert artifact_key("eval", "My Model_v2.1") == "eval-my-model-v2-1"
    assert artifact_key("health", "") == "health" and artifact_key("") == "model"


def test_outside_a_run_nothing_happens(caplog):
    assert not in_prefect_run()
    with caplog.at_level(logging.DEBUG, logger="loraship.ui"):
        publish_markdown("k", "# x", "d")
        publish_table("k", [{"a": 1}], "d")
        assert create_progress("d") is None
    assert not caplog.records  # not even an attempt: plain functions stay Prefect-free


@pytest.mark.slow
def test_inside_a_flow_the_artifacts_exist_and_a_refusal_is_only_logged(prefect_api, caplog):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter

    @flow
    def ui_flow() -> None:
        publish_markdown("ui test Markdown", "# hello", "a markdown")
        publish_table(artifact_key("ui", "Table One"), [{"quant": "Q8_0", "ppl": 1.5}], "a table")
        publish_table("ui-bad", [object()], "not serializable: refused, logged, the flow goes on")

    ui_log = logging.getLogger("loraship.ui")
    ui_log.addHandler(caplog.handler)  # the project's loggers may not propagate to the root once a run configured them
    try:
        with caplog.at_level(logging.DEBUG, logger="loraship.ui"):
            ui_flow()
    finally:
        ui_log.removeHandler(caplog.handler)
    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key={"any_": ["ui-test-markdown", "ui-table-one"]})
        )
    by_key = {a.key: a for a in found}
    assert set(by_key) == {"ui-test-markdown", "ui-table-one"}
    assert "# hello" in str(by_key["ui-test-markdown"].data) and "Q8_0" in str(by_key["ui-table-one"].data)
    assert any("no table artifact ui-bad" in r.getMessage() for r in caplog.records)


def test_outside_a_run_prefect_is_not_imported_to_find_out():
    """The convert stage's progress bar imported Prefect (~3 s) before its converter started, in every process that
    runs the stage's plain function: a benchmark measured it as stage overhead."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from tasks.core.progress import Progress\n"
        "from tasks.core.ui import in_prefect_run\n"
        "assert not in_prefect_run()\n"
        "Progress('convert x', 10).close()\n"
        "print('prefect' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
