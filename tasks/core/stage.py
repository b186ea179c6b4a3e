"""The thin Prefect wrapper every stage shares: naming, caching, retries.

A stage module holds its Settings model, a plain function that does the work (callable and testable
without Prefect) and a task made with `stage_task`. The flow binds each task to the run folder with
`bind(task, run)` so its cached records live in the run's .cache folder. The Prefect task is made when it is
first used (`LazyTask`), so importing a stage module does not import Prefect (~2 s): a process that only calls
the plain function (the fused converter, the benchmarks' children) does not pay for it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from tasks.core.caching import artifacts_policy
from tasks.core.errors import retry_if_transient
from tasks.core.scrub import install_log_scrubbing, scrub_exception

F = TypeVar("F", bound=Callable[..., Any])


def stage_task(
    stage: str,
    *,
    retries: int = 3,
    base_delay: float = 2.0,
    cache: bool = True,
    key_files: Iterable[Path] = (),
    **options: Any,
) -> Callable[[F], Any]:
    """Make a Prefect task for a stage: cached by content, retried only on transient errors with backoff.

    `key_files`: files the stage renders or copies (its templates): their contents are part of the cache key.
    """
    install_log_scrubbing()

    def deco(fn: F) -> Any:
        fn.__loraship_key_files__ = tuple(Path(p) for p in key_files)  # type: ignore[attr-defined]
        return LazyTask(functools.partial(_make_task, fn, stage, retries, base_delay, cache, options))

    return deco


def _make_task(fn: F, stage: str, retries: int, base_delay: float, cache: bool, options: dict[str, Any]) -> Any:
    from prefect import task
    from prefect.tasks import exponential_backoff

    kw: dict[str, Any] = dict(
        name=stage,
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=base_delay) if retries else 0,
        retry_jitter_factor=0.5 if retries else None,
        retry_condition_fn=retry_if_transient,
        persist_result=cache,
    )
    if cache:
        kw["cache_policy"] = artifacts_policy()
    else:
        from prefect.cache_policies import NO_CACHE

        kw["cache_policy"] = NO_CACHE
    kw.update(options)
    return task(**kw)(_scrubbed(fn))


class LazyTask:
    """A stage's Prefect task, made (once, thread-safely) the first time anything but the plain function is
    asked of it; then every attribute and call is the task's own (`.fn`, `.with_options`, `.submit`, `.map`)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._task: Any = None
        self._lock = threading.Lock()

    @property
    def task(self) -> Any:
        if self._task is None:
            with self._lock:
                if self._task is None:
                    self._task = self._make()
        return self._task

    def __getattr__(self, name: str) -> Any:  # only for names LazyTask itself does not have
        if name.startswith("__") or name in ("_make", "_task", "_lock"):
            raise AttributeError(name)
        return getattr(self.task, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.task(*args, **kwargs)

    def __repr__(self) -> str:
        return f"LazyTask({self._task!r})" if self._task is not None else "LazyTask(not made yet)"


def _scrubbed(fn: F) -> F:
    """`fn` whose exceptions leave it scrubbed of credentials (tasks.core.scrub), before Prefect stores
    their text as the task run's state message (the UI) or the flow records it in the manifest."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            clean = scrub_exception(exc)
            if clean is exc:
                raise
            raise clean from None

    return wrapper  # type: ignore[return-value]


def bind(task: Any, cache_dir: Path, refresh: bool = False) -> Any:
    """The task with its results stored under `cache_dir` (a Path: a str would name a storage block)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    return task.with_options(result_storage=Path(cache_dir), refresh_cache=refresh or None)
