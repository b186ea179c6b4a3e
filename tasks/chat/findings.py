"""What the contract check found: errors fail the stage, warnings are reported, notes explain."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"
    NOTE = "note"


class Verdict(StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Finding:
    severity: Severity
    check: str  # tokens | stops | generation | runtime | family
    message: str
    runtime: str | None = None
    conversation: str | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["severity"] = self.severity.value
        return d


def verdict(findings: list[Finding]) -> Verdict:
    if any(f.severity is Severity.ERROR for f in findings):
        return Verdict.FAIL
    if any(f.severity is Severity.WARNING for f in findings):
        return Verdict.WARN
    return Verdict.PASS
