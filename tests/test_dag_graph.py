"""The DAG's scheduling on its own: which stages run, wait, overlap or are skipped, and why.

Every runner of the stage table is replaced by a stand-in that records when it ran (and fails or skips
where a test says), so a run takes seconds; the flow, the graph walk, the Prefect task runs, the manifest,
the summary and the notification text are the real ones. tests/test_dag.py runs the same graph with the
real stages on the demo model.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from flows.stages import SPECS, STAGES
from tasks.core.errors import StageSkipped
from tasks.core.vocab import Stage
from tests.prefect_server import settled_task_runs

pytestmark = [pytest.mark.prefect]


class StandIns:
    """Stand-in runners for every stage: each records its wall-clock span; `fail`/`skip`/`sleep` per stage.

    `meet[stage]`: stages this one waits to see started (up to MEET_S) before it ends. Two stages that meet each
    other overlap whenever the flow runs them side by side, however slow the machine (a fixed sleep only
    overlapped them when both started within it); a flow that runs them one after the other makes the first wait
    out MEET_S and the spans do not overlap."""

    MEET_S = 30.0

    def __init__(self) -> None:
        self.spans: dict[str, tuple[float, float]] = {}
        self.fail: dict[str, BaseException] = {}
        self.skip: dict[str, str] = {}
        self.sleep: dict[str, float] = {}
        self.meet: dict[str, tuple[str, ...]] = {}
        self._started: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def _event(self, stage: str) -> threading.Event:
        with self._lock:
            return self._started.setdefault(stage, threading.Event())

    def runner(self, stage: str) -> Any:
        def run(ctx: Any) -> list:
            t0 = time.time()
            self._event(stage).set()
            for other in self.meet.get(stage, ()):
                self._event(other).wait(self.MEET_S)
            time.sleep(self.sleep.get(stage, 0.0))
            with self._lock:
                self.spans[stage] = (t0, time.time())
            if stage in self.fail:
                raise self.fail[stage]
            if stage in self.skip:
                raise StageSkipped(self.skip[stage])
            return []

        return run

    def reset(self) -> None:
        self.spans.clear()
        self.fail.clear()
        self.skip.clear()
        self.sleep.clear()
        self.meet.clear()
        with self._lock:
            self._started.clear()


@pytest.fixture
def standins(monkeypatch: pytest.MonkeyPatch, prefect_api) -> StandIns:
    from flows import stages

    s = StandIns()
    for name in STAGES:
        monkeypatch.setitem(stages.RUNNERS, name, s.runner(name))
    return s


def _config(tmp_path: Path, **pipeline: Any) -> dict[str, Any]:
    adapter = tmp_path / "adapter"
    adapter.mkdir(exist_ok=True)
    return {
        "model": {"name": "graph", "version": "v1"},
        "source": {"kind": "local", "path": str(adapter)},
        "pipeline": {"runs_dir": str(tmp_path / "runs"), **pipeline},
    }


def _run(cfg: dict[str, Any], **kw: Any) -> tuple[Any, Any]:
    from flows.full import full

    state = full(config=cfg, return_state=True, **kw)
    assert state.is_completed(), state.message
    return state, state.result()


def _outcomes(summary: Any) -> dict[str, tuple[str, str]]:
    return {s.stage: (str(s.status), s.message) for s in summary.stages}


def _manifest_stages(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "runs" / "graph" / "v1" / "manifest.json").read_text())["stages"]


def test_a_failed_stage_skips_the_stages_that_need_it_and_says_why(tmp_path: Path, standins: StandIns) -> None:
    from flows.notifications import compose

    standins.fail["hub_push"] = RuntimeError("the Hub answered 503")
    _, summary = _run(_config(tmp_path, continue_on_error=True))
    out = _outcomes(summary)
    assert summary.degraded and out["hub_push"][0] == "degraded"
    why = "skipped because hub_push: failed (RuntimeError: the Hub answered 503)"
    assert out["space"] == ("skipped", why) and "space" not in standins.spans
    assert out["card"][0] == "done"  # card only uses hub_push: a failed soft upstream does not stop it
    assert _manifest_stages(tmp_path)["space"]["status"] == "skipped"
    assert why in _manifest_stages(tmp_path)["space"]["message"]
    _, body = compose(summary, "degraded")
    assert f"- space: skipped ({why})" in body


def test_the_reason_follows_the_chain_and_a_stage_with_nothing_to_do_stops_nothing(
    tmp_path: Path, standins: StandIns
) -> None:
    standins.fail["gate"] = ValueError("no eval report")
    _, summary = _run(_config(tmp_path, continue_on_error=True))
    out = _outcomes(summary)
    gate_failed = "gate: failed (ValueError: no eval report)"
    for stage in ("local_deploy", "hub_push", "card"):
        assert out[stage] == ("skipped", f"skipped because {gate_failed}"), stage
    assert out["space"] == ("skipped", f"skipped because hub_push: {gate_failed}")
    assert out["template_contract"] == ("skipped", f"skipped because local_deploy: {gate_failed}")
    assert {"serve", "health", "evaluate"} <= set(standins.spans)  # not downstream of the gate: they ran

    standins.reset()
    standins.skip["local_deploy"] = "deployment.targets is empty"
    _, summary = _run(_config(tmp_path))
    out = _outcomes(summary)
    assert out["local_deploy"] == ("skipped", "deployment.targets is empty")
    assert out["template_contract"][0] == "done" and "template_contract" in standins.spans


def test_only_skip_and_from_run_just_the_chosen_stages(tmp_path: Path, standins: StandIns) -> None:
    cfg = _config(tmp_path)
    _, summary = _run(cfg, from_stage="hub_push")
    # the gate is implied: the publishing stages after it need its decision
    assert set(standins.spans) == {"gate", "hub_push", "card", "space"}
    assert [s.stage for s in summary.stages] == [s for s in STAGES if s in {"gate", "hub_push", "card", "space"}]

    standins.reset()
    _, summary = _run(cfg, only=["serve", "health", "evaluate"])
    assert set(standins.spans) == {"serve", "health", "evaluate"}
    assert [s.stage for s in summary.stages] == [s for s in STAGES if s in {"serve", "health", "evaluate"}]

    standins.reset()
    _, summary = _run(cfg, skip=["space", "template_contract"])
    assert set(standins.spans) == set(STAGES) - {"space", "template_contract"}
    assert "space" not in _outcomes(summary) and _outcomes(summary)["card"][0] == "done"


def test_a_failed_critical_stage_starts_nothing_after_it(tmp_path: Path, standins: StandIns) -> None:
    from flows.full import full

    standins.fail["convert"] = RuntimeError("converter crashed")
    state = full(config=_config(tmp_path, continue_on_error=True), return_state=True)
    assert state.is_failed()
    assert set(standins.spans) == {"download", "merge", "convert"}
    stages = _manifest_stages(tmp_path)
    assert stages["convert"]["status"] == "failed" and "quantize" not in stages


def _stage_task_runs(state: Any) -> dict[str, Any]:
    runs = settled_task_runs(state.state_details.flow_run_id, names=[f"stage:{s}" for s in STAGES])
    return {r.name.removeprefix("stage:"): r for r in runs if r.name.startswith("stage:")}


def test_the_task_runs_wait_for_exactly_their_upstreams_and_independent_ones_overlap(
    tmp_path: Path, standins: StandIns
) -> None:
    from flows.config import parse_config

    gate = {"max_kl_div": 0.1}  # the gate then waits for health and evaluate too (its `wants`)
    cfg = _config(tmp_path, gate=gate)
    # evaluate runs beside serve and then health: serve ends only once evaluate has started, evaluate only
    # once health has (health follows serve), health only once evaluate has
    standins.meet.update(serve=("evaluate",), evaluate=("health",), health=("evaluate",))
    state, _ = _run(cfg)
    runs = _stage_task_runs(state)
    assert set(runs) == set(STAGES)
    ids = {stage: r.id for stage, r in runs.items()}
    parsed = parse_config(cfg)
    for stage in STAGES:  # the edges the Prefect UI draws are the table's, under this config
        waits = {w.id for w in runs[stage].task_inputs.get("wait_for", [])}
        assert waits == {ids[u] for u in SPECS[Stage(stage)].upstream_for(parsed)}, stage
    assert {ids["health"], ids["evaluate"]} <= {w.id for w in runs["gate"].task_inputs["wait_for"]}

    def overlap(a: str, b: str) -> bool:
        (a0, a1), (b0, b1) = standins.spans[a], standins.spans[b]
        return a0 < b1 and b0 < a1

    assert overlap("serve", "evaluate") and overlap("health", "evaluate")
    # the Hub push waits for the chat-template contract (its report goes into the card), which checks what
    # local_deploy installed; without the contract, LM Studio/Ollama and the Hub upload run side by side
    assert not overlap("local_deploy", "hub_push")
    standins.reset()
    standins.meet.update(local_deploy=("hub_push",), hub_push=("local_deploy",))
    _run(cfg, skip=["template_contract"])
    assert overlap("local_deploy", "hub_push")

    # one stage at a time: the same graph, walked in the table's order, nothing overlapping
    standins.reset()
    for stage in ("serve", "evaluate"):
        standins.sleep[stage] = 0.3
    _run(_config(tmp_path, gate=gate, max_parallel_stages=1))
    order = sorted(standins.spans, key=lambda s: standins.spans[s][0])
    assert order == list(STAGES)
    spans = [standins.spans[s] for s in order]
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:]))


def test_task_runs_are_read_once_the_server_has_recorded_them(prefect_api) -> None:
    """The server records task runs from events after the flow returns: a read must wait for them (CI flake)."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Pending

    @flow
    def host() -> None: ...

    @task
    def late() -> None: ...

    with get_client(sync_client=True) as client:
        run_id = client.create_flow_run(host).id

        def record_later() -> None:
            time.sleep(1.0)
            with get_client(sync_client=True) as c:
                tr = c.create_task_run(late, run_id, "0", name="stage:card", state=Pending())
                c.set_task_run_state(tr.id, Completed(), force=True)

        writer = threading.Thread(target=record_later)
        writer.start()
        try:
            with pytest.raises(AssertionError, match="stage:card"):
                settled_task_runs(run_id, names=["stage:card"], timeout=0.1)
            runs = settled_task_runs(run_id, names=["stage:card"], timeout=30)
        finally:
            writer.join()
    (card,) = runs
    assert card.name == "stage:card" and card.state.is_completed() and card.end_time is not None
