"""Dynamic batching: concurrent /predict requests coalesced into one pipeline call, in one worker thread.

Why a thread of its own: the model must never run on the event loop (then /health would wait behind
it, the complaint about HF Inference Endpoints' toolkit), and a transformers pipeline is not meant to
be called from several threads at once. So requests queue here; the worker takes everything waiting
(up to `max_batch_size` inputs with the same parameters), waits at most `max_wait_ms` for more when the
batch is not full, calls the pipeline once and hands each request its slice. Under load the queue fills
while a batch runs, so batches grow by themselves. The wait is spent only when requests have been arriving
together: after a batch of one request, a request that finds nobody else queued starts at once, so a lone
client pays no `max_wait_ms` (it doubled the tiny classifier's latency at one client: 11.1 ms p50 against
5.8 ms for the hand-written server, benchmarks/predict_bench.py).

A batch that raises is retried one request at a time, so one bad input fails only its own request
(a 500 with the message) and the server stays up.

Results go back to the event loop in one hop per batch (`submit_async`): one `call_soon_threadsafe`
sets every waiting request's asyncio future, where a concurrent future per request would wake the loop
once per request (32 self-pipe writes and callbacks for a 32-input batch, on the loop that also parses
the next requests and answers /health).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("loraship.model_api")

#: run(inputs, params) -> one result per input
BatchRunner = Callable[[list[Any], dict[str, Any]], list[Any]]


@dataclass
class _Job:
    items: list[Any]
    params: dict[str, Any]
    key: str
    #: a concurrent future (`submit`), or an asyncio future on `loop` (`submit_async`)
    future: Future | asyncio.Future = field(default_factory=Future)
    loop: asyncio.AbstractEventLoop | None = None
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class Outcome:
    """A request's results and the time its pipeline call took."""

    results: list[Any]
    inference_ms: float
    batch_size: int


class Batcher:
    def __init__(self, run: BatchRunner, max_batch_size: int = 32, max_wait_ms: float = 5.0):
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._held: deque[_Job] = deque()  # taken from the queue but for a later batch (other params, full)
        self.batches = 0
        self.inputs = 0
        self.busy = False
        self._lone = True  # the last batch held one request: nobody arrives together with a new one
        self._thread = threading.Thread(target=self._loop, name="model-api-batcher", daemon=True)
        self._thread.start()

    def submit(self, items: list[Any], params: dict[str, Any], key: str | None = None) -> Future:
        """Queue one request; the future gets its `Outcome` (or the pipeline's exception).

        `key` groups requests that may share a pipeline call (default: the parameters as sorted JSON)."""
        job = _Job(items, params, key if key is not None else params_key(params))
        self._queue.put(job)
        return job.future  # type: ignore[return-value]

    def submit_async(self, items: list[Any], params: dict[str, Any], key: str | None = None) -> asyncio.Future:
        """`submit` from a coroutine: an asyncio future of the running loop, set in one hop per batch."""
        loop = asyncio.get_running_loop()
        job = _Job(items, params, key if key is not None else params_key(params), loop.create_future(), loop)
        self._queue.put(job)
        return job.future  # type: ignore[return-value]

    @property
    def pending(self) -> int:
        return self._queue.qsize() + len(self._held)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    # --- worker ---------------------------------------------------------------------------------
    def _next(self, timeout: float | None) -> _Job | None:
        if self._held:
            return self._held.popleft()
        try:
            return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _gather(self, first: _Job) -> list[_Job]:
        batch, n = [first], len(first.items)
        if self._lone and not self._held and self._queue.empty():
            return batch  # a lone client: waiting would only add max_wait_ms to its latency
        deadline = time.perf_counter() + self.max_wait_s
        skipped: list[_Job] = []
        while n < self.max_batch_size:
            job = self._next(max(0.0, deadline - time.perf_counter()))
            if job is None:
                break
            if job.key != first.key or n + len(job.items) > self.max_batch_size:
                skipped.append(job)
                continue
            batch.append(job)
            n += len(job.items)
        self._held.extendleft(reversed(skipped))
        return batch

    def _loop(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            batch = self._gather(first)
            self._lone = len(batch) == 1
            self.busy = True
            try:
                self._execute(batch)
            finally:
                self.busy = False

    def _execute(self, batch: list[_Job]) -> None:
        items = [x for job in batch for x in job.items]
        t0 = time.perf_counter()
        try:
            results = self.run(items, batch[0].params)
            if len(results) != len(items):
                raise RuntimeError(f"the pipeline returned {len(results)} results for {len(items)} inputs")
        except Exception as exc:
            if len(batch) > 1:  # find the request that broke it; the others still get answers
                for job in batch:
                    self._execute([job])
                return
            log.warning("pipeline call failed: %s", exc)
            _settle([(batch[0], exc)])
            return
        ms = (time.perf_counter() - t0) * 1000.0
        self.batches += 1
        self.inputs += len(items)
        done: list[tuple[_Job, Outcome | BaseException]] = []
        i = 0
        for job in batch:
            done.append((job, Outcome(results[i : i + len(job.items)], ms, len(items))))
            i += len(job.items)
        _settle(done)


def params_key(params: dict[str, Any]) -> str:
    """Requests with equal keys may share a pipeline call: the parameters as canonical JSON."""
    return json.dumps(params, sort_keys=True, default=str)


def _settle(done: list[tuple[_Job, Outcome | BaseException]]) -> None:
    """Hand each job its outcome: concurrent futures directly, asyncio futures in one callback per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, Outcome | BaseException]]] = {}
    for job, value in done:
        if job.loop is None:
            fut: Any = job.future
            fut.set_exception(value) if isinstance(value, BaseException) else fut.set_result(value)
        else:
            by_loop.setdefault(job.loop, []).append((job, value))
    for loop, jobs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_all, jobs)
        except RuntimeError:  # the loop has closed (server shutting down): nobody is waiting any more
            pass


def _set_all(jobs: list[tuple[_Job, Outcome | BaseException]]) -> None:
    """On the event loop: set the asyncio futures (a request whose client went away is cancelled: skip it)."""
    for job, value in jobs:
        fut: Any = job.future
        if fut.done():
            continue
        fut.set_exception(value) if isinstance(value, BaseException) else fut.set_result(value)
