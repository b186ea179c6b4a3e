"""Threads that keep the context of the code that starts them.

Why: which run's and which stage's log file a record goes to is decided by context variables
(tasks/core/runlog.py: `_RUN`, `_STAGE`). Prefect's own pools copy the context into their threads, but a
`ThreadPoolExecutor` or `threading.Thread` a stage starts for itself (the quantize stage's parallel types,
the converter's side checks, the download's hashing) starts with an empty one, so its records landed in
`pipeline.log` only while one run was open, and in no file with two (flows/multi.py). The standard library's
`contextvars.copy_context().run` is the whole fix; these two wrappers apply it where threads are made.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class ContextPool(ThreadPoolExecutor):
    """A ThreadPoolExecutor whose every job runs in a copy of the submitter's context (taken at submit)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:  # type: ignore[override]
        return super().submit(contextvars.copy_context().run, fn, *args, **kwargs)


def context_thread(target: Callable[..., Any], *, name: str | None = None, daemon: bool = True) -> threading.Thread:
    """A (not yet started) thread that runs `target` in a copy of the caller's context."""
    ctx = contextvars.copy_context()
    return threading.Thread(target=ctx.run, args=(target,), name=name, daemon=daemon)
