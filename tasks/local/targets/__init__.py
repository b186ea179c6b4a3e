"""The local targets: where desktop apps on this machine find the GGUFs. One table, one small contract.

Adding a target is one file: a `LocalTarget` subclass in this package (tasks/local/targets/base.py: a name,
a title, a one-line description, `availability(settings)` saying whether its app/CLI is here and what deploy
does either way, `deploy(...)` returning the `local:<name>` record), plus its instance in `LOCAL_TARGETS`
below. `deployment.targets` is validated against this table, and tests/test_local_targets.py runs the same
conformance checks over every entry: `python -m pytest -q -p no:cacheprovider tests/test_local_targets.py`.
"""

from __future__ import annotations

from tasks.core.registry import Contract, Registry
from tasks.local.targets.base import Availability, LocalTarget
from tasks.local.targets.lmstudio import LMStudioTarget
from tasks.local.targets.ollama import OllamaTarget

LOCAL_TARGETS: Registry[LocalTarget] = Registry(
    "local target",
    "deployment.targets",
    [LMStudioTarget(), OllamaTarget()],
    contract=Contract(LocalTarget, run="deploy", unavailable=LocalTarget.unavailable),
)

__all__ = ["LOCAL_TARGETS", "Availability", "LocalTarget"]
