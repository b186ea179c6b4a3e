"""The release gate: which quantizations ship, decided from the health check and the evaluation.

Between evaluation and publishing the flow asks the gate (`pipeline.gate`; off unless configured). It
can require a `healthy` verdict (`require_healthy`; `allow_degraded` lets a degraded one through) and
per-quantization limits against the F16: the largest mean KL-divergence (`max_kl_div`), the largest
perplexity increase as a fraction of the F16's (`max_ppl_increase`: 0.05 = 5%), the smallest top-1
agreement (`min_top1_agreement`); `quants:` overrides the limits for single types. A quantization that
fails is withheld: not published, linked into LM Studio/Ollama or put in the Space; the others ship. The
F16 is the reference and passes the quality limits by definition. Missing evidence fails closed: a limit
without an evaluation of that quantization, or `require_healthy` without a health report, withholds.

`pipeline.approval: true` adds a person: the flow pauses (Prefect's pause with a typed input whose form
shows the eval table and the gate's decision) and resumes from the UI or the API with approve or reject;
a rejection, or no answer within `pipeline.approval_timeout_s`, ships nothing.

The decision is the stage's artifact `report:gate` (reports/gate.json): what passed, what was withheld
and why, the limits, the health verdict and the approval. Publishing stages read it; the run summary,
the notifications and the manifest say it.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_write_json
from tasks.core.settings import StrictModel
from tasks.core.stage import stage_task
from tasks.core.vocab import ArtifactKind, HealthVerdict, Stage
from tasks.gguf import quant_types

STAGE = Stage.GATE
log = logging.getLogger("loraship.gate")
# The unquantized types (the table's float rows, by rank: F16, BF16, F32): the reference, never withheld.
REFERENCE = tuple(q for q in quant_types.names() if quant_types.is_float(q))


class QuantLimits(StrictModel):
    max_kl_div: float | None = Field(
        None, ge=0, description="largest mean KL-divergence against the F16 a quantization may have to ship"
    )
    max_ppl_increase: float | None = Field(
        None, ge=0, description="largest perplexity increase over the F16, as a fraction (0.05 = 5% higher)"
    )
    min_top1_agreement: float | None = Field(
        None, ge=0, le=1, description="smallest share of tokens whose top-1 prediction matches the F16's"
    )

    def any(self) -> bool:
        return any(v is not None for v in (self.max_kl_div, self.max_ppl_increase, self.min_top1_agreement))


class GateSettings(QuantLimits):
    """`pipeline.gate`: what a release needs. Unset (the default, and the demo): everything ships."""

    require_healthy: bool = Field(True, description="the health check's verdict must be healthy")
    allow_degraded: bool = Field(False, description="with require_healthy, a degraded verdict is enough")
    quants: dict[str, QuantLimits] = Field(
        default_factory=dict, description="limits for single quantization types, replacing the ones above"
    )

    def limits_for(self, quant: str) -> QuantLimits:
        return self.quants.get(quant) or self.quants.get(quant.upper()) or self


class Decision(BaseModel):
    enabled: bool
    passed: list[str]
    withheld: dict[str, str] = Field(default_factory=dict, description="quant -> why it does not ship")
    health: str | None = Field(None, description="the verdict the gate saw (None: not checked or no report)")
    approval: dict[str, Any] | None = None
    blocked: str | None = Field(None, description="why nothing ships (None: something does)")

    def summary(self) -> str:
        if not self.enabled and self.approval is None:
            return "off (pipeline.gate not set): every quantization ships"
        parts = [f"ships {', '.join(self.passed)}" if self.passed else "ships nothing"]
        if self.withheld:
            parts.append("withheld " + "; ".join(f"{q} ({why})" for q, why in self.withheld.items()))
        if self.approval is not None:
            a = self.approval
            who = f" by {a['reviewer']}" if a.get("reviewer") else ""
            parts.append(
                ("approved" if a.get("approve") else "not approved") + who + (f": {a['note']}" if a.get("note") else "")
            )
        return "; ".join(parts)


def _quant(a: Artifact) -> str:
    return str(a.meta.get("quant") or a.name.partition(":")[2])


def _quality_problem(quant: str, row: dict[str, Any] | None, f16_ppl: float | None, lim: QuantLimits) -> str | None:
    if not lim.any() or quant.upper() in REFERENCE:
        return None
    if row is None:
        return "not evaluated in this run's lineage"
    kl, ppl, top1 = row.get("kl_div"), row.get("ppl"), row.get("top1_agreement")
    if lim.max_kl_div is not None:
        if kl is None:
            return "no KL-divergence measured"
        if kl > lim.max_kl_div:
            return f"KL {kl:.4g} > max_kl_div {lim.max_kl_div:g}"
    if lim.max_ppl_increase is not None:
        if ppl is None or not f16_ppl:
            return "no perplexity against the F16 measured"
        rise = ppl / f16_ppl - 1
        if rise > lim.max_ppl_increase:
            return f"perplexity +{rise:.2%} > max_ppl_increase {lim.max_ppl_increase:.2%}"
    if lim.min_top1_agreement is not None:
        if top1 is None:
            return "no top-1 agreement measured"
        if top1 < lim.min_top1_agreement:
            return f"top-1 agreement {top1:.4g} < min_top1_agreement {lim.min_top1_agreement:g}"
    return None


def _health_problem(settings: GateSettings, health: list[Artifact]) -> tuple[str | None, str | None]:
    """(verdict seen, why nothing may ship) for require_healthy."""
    if not settings.require_healthy:
        return None, None
    if not health:
        return None, "require_healthy: no health report in this run's lineage (the health stage did not run or failed)"
    verdicts = [str(h.meta.get("verdict")) for h in health]
    worst = HealthVerdict.worst(verdicts)
    if worst == HealthVerdict.UNHEALTHY or (worst == HealthVerdict.DEGRADED and not settings.allow_degraded):
        reasons = "; ".join(r for h in health for r in h.meta.get("reasons") or [])
        return worst, f"the health check says {worst}" + (f" ({reasons})" if reasons else "")
    return worst, None


def decide(
    ggufs: list[Artifact],
    settings: GateSettings | None,
    eval_report: Artifact | None = None,
    health: list[Artifact] | None = None,
) -> Decision:
    """Which of `ggufs` ship under `settings`, and why the others do not."""
    quants = [_quant(g) for g in ggufs]
    if settings is None:
        return Decision(enabled=False, passed=quants)
    verdict, unhealthy = _health_problem(settings, health or [])
    if unhealthy:
        return Decision(
            enabled=True, passed=[], withheld=dict.fromkeys(quants, unhealthy), health=verdict, blocked=unhealthy
        )
    table = (eval_report.meta.get("quants") or {}) if eval_report is not None else {}
    f16_ppl = next((table[q].get("ppl") for q in REFERENCE if q in table and table[q].get("ppl")), None)
    passed, withheld = [], {}
    for q in quants:
        problem = _quality_problem(q, table.get(q), f16_ppl, settings.limits_for(q))
        if problem is None:
            passed.append(q)
        else:
            withheld[q] = problem
    candidates = [q for q in quants if q.upper() not in REFERENCE]
    blocked = None
    if candidates and not any(q in passed for q in candidates):
        # the reference alone is not a release: nothing ships when every quantization is withheld
        blocked = "the release gate withheld every quantization: " + "; ".join(
            f"{q} ({w})" for q, w in withheld.items()
        )
        withheld |= {q: "no quantization passed the gate" for q in passed}
        passed = []
    return Decision(enabled=True, passed=passed, withheld=withheld, health=verdict, blocked=blocked)


def eval_markdown(eval_report: Artifact | None, decision: Decision) -> str:
    """What the reviewer sees in the approval form: the decision and the eval table."""
    lines = ["## Release approval", "", f"**Gate:** {decision.summary()}", ""]
    table = (eval_report.meta.get("quants") or {}) if eval_report is not None else {}
    if table:
        cols = ["size_mb", "ppl", "ppl_delta", "kl_div", "top1_agreement", "accuracy", "tokens_per_s"]
        lines += [
            "| quant | ships | " + " | ".join(cols) + " |",
            "| --- | --- | " + " | ".join("---:" for _ in cols) + " |",
        ]
        for q, row in table.items():
            cells = [
                "" if row.get(c) is None else f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                for c in cols
            ]
            ships = "yes" if q in decision.passed else ("no" if q in decision.withheld else "-")
            lines.append(f"| {q} | {ships} | " + " | ".join(cells) + " |")
    else:
        lines.append("(no evaluation in this run)")
    lines += ["", "Set **approve** to publish the quantizations marked `yes`, or leave it off to reject."]
    return "\n".join(lines)


@functools.cache
def approval_input() -> type:
    """The typed input of the approval pause (a Prefect RunInput: the UI renders it as a form)."""
    from prefect.input import RunInput

    class ReleaseApproval(RunInput):
        approve: bool = Field(False, description="publish the quantizations the gate passed")
        reviewer: str = Field("", description="who decided (for the run record)")
        note: str = Field("", description="why (for the run record)")

    return ReleaseApproval


def ask_approval(decision: Decision, eval_report: Artifact | None, timeout_s: int, poll_s: int = 5) -> dict[str, Any]:
    """Pause the flow run until a person approves or rejects; returns {approve, reviewer, note}."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    form = approval_input().with_initial_data(description=eval_markdown(eval_report, decision), approve=False)
    log.info("waiting for approval (resume the flow run in the Prefect UI or through its API)")
    try:
        answer = pause_flow_run(wait_for_input=form, timeout=timeout_s, poll_interval=poll_s, key="loraship-approval")
    except FlowPauseTimeout:
        return {"approve": False, "reviewer": "", "note": f"no answer within {timeout_s} s"}
    return {"approve": bool(answer.approve), "reviewer": answer.reviewer, "note": answer.note}


def gate(
    ggufs: list[Artifact],
    settings: GateSettings | None,
    out_path: Path,
    *,
    eval_report: Artifact | None = None,
    health: list[Artifact] | None = None,
    approval: bool = False,
    approval_timeout_s: int = 3600,
) -> Artifact:
    """Decide (and, with `approval`, ask), write out_path (gate.json) and return `report:gate`."""
    decision = decide(ggufs, settings, eval_report, health)
    if approval and decision.passed:
        answer = ask_approval(decision, eval_report, approval_timeout_s)
        decision.approval = answer
        if not answer["approve"]:
            why = "rejected" + (f" by {answer['reviewer']}" if answer["reviewer"] else "")
            why += f": {answer['note']}" if answer["note"] else ""
            decision.withheld |= dict.fromkeys(decision.passed, why)
            decision.passed = []
            decision.blocked = f"the release was not approved ({why})"
    atomic_write_json(out_path, decision.model_dump(mode="json"))
    log.info("release gate: %s", decision.summary())
    inputs = [*ggufs, *(x for x in (eval_report, *(health or [])) if x is not None)]
    return Artifact.from_path(
        out_path,
        name="report:gate",
        kind=ArtifactKind.REPORT,
        stage=STAGE,
        inputs=inputs,
        settings=settings,
        meta=decision.model_dump(mode="json"),
    )


@stage_task(STAGE, cache=False, retries=0)
def gate_task(
    ggufs: list[Artifact],
    settings: GateSettings | None,
    out_path: Path,
    eval_report: Artifact | None = None,
    health: list[Artifact] | None = None,
    approval: bool = False,
    approval_timeout_s: int = 3600,
) -> Artifact:
    return gate(
        ggufs,
        settings,
        out_path,
        eval_report=eval_report,
        health=health,
        approval=approval,
        approval_timeout_s=approval_timeout_s,
    )
