"""The thin Prefect wrapper every stage shares: naming, caching, retries.

A stage module holds its Settings model, a plain function that does the work (callable and testable
without Prefect) and a task made with `stage_task`. The flow binds each task to the run folder with
`bind(task, run)` so its cached records live in the run's .cache folder.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from tasks.core.caching import ARTIFACTS
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
    from prefect import task
    from prefect.tasks import exponential_backoff

    install_log_scrubbing()

    def deco(fn: F) -> Any:
        kw: dict[str, Any] = dict(
            name=stage,
            retries=retries,
            retry_delay_seconds=exponential_backoff(backoff_factor=base_delay) if retries else 0,
            retry_jitter_factor=0.5 if retries else None,
            retry_condition_fn=retry_if_transient,
            persist_result=cache,
        )
        if cache:
            kw["cache_policy"] = ARTIFACTS
        else:
            from prefect.cache_policies import NO_CACHE

            kw["cache_policy"] = NO_CACHE
        kw.update(options)
        fn.__loraship_key_files__ = tuple(Path(p) for p in key_files)  # type: ignore[attr-defined]
        return task(**kw)(_scrubbed(fn))

    return deco


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
