"""The release gate's decision (tasks/release/gate.py): limits per quantization, health, missing evidence."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.core.artifacts import Artifact
from tasks.release.gate import GateSettings, decide, eval_markdown, gate
from tests.hub_fixtures import eval_artifact, gguf_artifacts

EVAL = {
    "F16": {"ppl": 10.0, "kl_div": 0.0, "top1_agreement": 1.0},
    "Q8_0": {"ppl": 10.05, "kl_div": 0.0004, "top1_agreement": 0.99},
    "Q4_K_M": {"ppl": 11.0, "kl_div": 0.04, "top1_agreement": 0.9},
}


@pytest.fixture
def ggufs(tmp_path: Path) -> list[Artifact]:
    return gguf_artifacts(tmp_path / "g")  # F16, Q8_0, Q4_K_M


def _health(tmp_path: Path, verdict: str) -> Artifact:
    p = tmp_path / f"health-{verdict}.json"
    p.write_text(verdict)
    meta = {"verdict": verdict, "reasons": [] if verdict == "healthy" else ["answer too short"]}
    return Artifact.from_path(p, name="report:health", kind="report", stage="health", meta=meta)


def test_off_everything_ships(ggufs) -> None:
    d = decide(ggufs, None)
    assert d.passed == ["F16", "Q8_0", "Q4_K_M"] and not d.enabled and d.blocked is None
    assert d.summary().startswith("off")


def test_limits_withhold_what_exceeds_them(tmp_path, ggufs) -> None:
    ev = eval_artifact(tmp_path / "eval.json", EVAL)
    d = decide(ggufs, GateSettings(max_kl_div=0.01, require_healthy=False), ev)
    assert d.passed == ["F16", "Q8_0"] and "KL 0.04 > max_kl_div 0.01" in d.withheld["Q4_K_M"]
    d = decide(ggufs, GateSettings(max_ppl_increase=0.05, require_healthy=False), ev)
    assert "perplexity +10.00%" in d.withheld["Q4_K_M"] and "Q8_0" in d.passed
    d = decide(ggufs, GateSettings(min_top1_agreement=0.95, require_healthy=False), ev)
    assert "top-1 agreement 0.9 < min_top1_agreement 0.95" == d.withheld["Q4_K_M"]
    relaxed = GateSettings(max_kl_div=0.01, require_healthy=False, quants={"Q4_K_M": {"max_kl_div": 0.05}})
    assert decide(ggufs, relaxed, ev).passed == ["F16", "Q8_0", "Q4_K_M"]


def test_missing_evidence_fails_closed(tmp_path, ggufs) -> None:
    d = decide(ggufs, GateSettings(max_kl_div=0.01, require_healthy=False), None)
    assert d.passed == [] and "not evaluated" in d.withheld["Q8_0"] and d.blocked
    d = decide(ggufs, GateSettings(), None, [])
    assert d.passed == [] and "no health report" in d.blocked


def test_health(tmp_path, ggufs) -> None:
    ev = eval_artifact(tmp_path / "eval.json", EVAL)
    assert decide(ggufs, GateSettings(), ev, [_health(tmp_path, "healthy")]).passed == ["F16", "Q8_0", "Q4_K_M"]
    d = decide(ggufs, GateSettings(), ev, [_health(tmp_path, "degraded")])
    assert d.passed == [] and "degraded (answer too short)" in d.blocked
    assert decide(ggufs, GateSettings(allow_degraded=True), ev, [_health(tmp_path, "degraded")]).passed
    assert decide(ggufs, GateSettings(allow_degraded=True), ev, [_health(tmp_path, "unhealthy")]).passed == []


def test_the_reference_alone_is_no_release(tmp_path, ggufs) -> None:
    ev = eval_artifact(tmp_path / "eval.json", EVAL)
    d = decide(ggufs, GateSettings(max_kl_div=0.0001, require_healthy=False), ev)
    assert d.passed == [] and d.withheld["F16"] == "no quantization passed the gate"
    assert "withheld every quantization" in d.blocked


def test_the_record_and_the_reviewers_table(tmp_path, ggufs) -> None:
    ev = eval_artifact(tmp_path / "eval.json", EVAL)
    art = gate(ggufs, GateSettings(max_kl_div=0.01, require_healthy=False), tmp_path / "gate.json", eval_report=ev)
    assert art.name == "report:gate" and art.meta["passed"] == ["F16", "Q8_0"]
    assert art.inputs["report:eval"] == ev.sha256 and art.inputs["gguf:Q4_K_M"]
    md = eval_markdown(ev, decide(ggufs, GateSettings(max_kl_div=0.01, require_healthy=False), ev))
    assert "| Q4_K_M | no |" in md and "| Q8_0 | yes |" in md and "kl_div" in md
