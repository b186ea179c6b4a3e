"""Under CI=true a skipped test fails the run (a pytest plugin; tests/conftest.py imports its hooks).

A skip hides missing work: a browser or Dask that failed to install would turn whole modules green with
`importorskip`. Locally a skip stays a skip (reported by `-ra`); in CI it is an error naming each one.
Expected failures (xfail) are not skips and are left alone.
"""

from __future__ import annotations

import os

import pytest

_SKIPPED: list[str] = []


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:
        _SKIPPED.append(f"{report.nodeid}: {_reason(report)}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.append(f"{report.nodeid}: {_reason(report)}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _ci() and _SKIPPED and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _ci() and _SKIPPED:
        terminalreporter.section("skipped tests fail under CI=true", sep="=", red=True, bold=True)
        for line in _SKIPPED:
            terminalreporter.line(f"SKIPPED (an error in CI) {line}", red=True)
        terminalreporter.line("install what they need (./setup.sh --test), or fix the cause; do not skip in CI")
