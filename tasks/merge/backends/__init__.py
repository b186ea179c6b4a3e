"""The merge backends: one table, one small contract (tasks/merge/backends/base.py).

Adding a backend is one file: a `MergeBackend` subclass in this package (a name, a one-line description,
`unavailable()` giving the reason it cannot run here or None, and `run(job, out_dir, progress)` writing
the merged safetensors into out_dir), plus its instance in `MERGE_BACKENDS` below. `merge.backend` is
validated against this table, and tests/test_merge_backends.py runs the same conformance checks over every
entry: `python -m pytest -q -p no:cacheprovider tests/test_merge_backends.py`.
"""

from __future__ import annotations

from tasks.core.registry import Contract, Registry
from tasks.merge.backends.base import MergeBackend, MergeJob
from tasks.merge.backends.peft import PeftBackend
from tasks.merge.backends.streaming import StreamingBackend
from tasks.merge.backends.unsloth import UnslothBackend

MERGE_BACKENDS: Registry[MergeBackend] = Registry(
    "merge backend",
    "merge.backend",
    [StreamingBackend(), PeftBackend(), UnslothBackend()],
    contract=Contract(MergeBackend, run="run", unavailable=MergeBackend.unavailable),
)
DEFAULT_BACKEND = "streaming"

__all__ = ["MERGE_BACKENDS", "DEFAULT_BACKEND", "MergeBackend", "MergeJob"]
