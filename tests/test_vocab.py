"""The vocabulary enums (tasks/core/vocab.py) keep their JSON spelling and their order of severity."""

from __future__ import annotations

import json

from tasks.core.vocab import HealthVerdict, StageStatus


def test_health_verdicts_spell_as_text_and_know_the_worst():
    assert json.dumps({"verdict": HealthVerdict.DEGRADED}) == '{"verdict": "degraded"}'
    assert HealthVerdict.worst(["healthy", "degraded"]) == HealthVerdict.DEGRADED == "degraded"
    assert HealthVerdict.worst(["degraded", "unhealthy", "healthy"]) is HealthVerdict.UNHEALTHY
    assert HealthVerdict.worst([]) is HealthVerdict.worst(["None"]) is HealthVerdict.HEALTHY


def test_stage_statuses_that_let_dependants_go_on():
    assert {s for s in StageStatus if s.ok} == {StageStatus.DONE, StageStatus.CACHED, StageStatus.DRY_RUN}
