"""The batcher alone (tasks/model_api/batching.py), with a plain function as the pipeline: no server needed."""

from __future__ import annotations

import threading

from tasks.model_api.batching import Batcher


def _recording() -> tuple[list[int], threading.Event, object]:
    sizes: list[int] = []
    gate = threading.Event()

    def run(items: list, params: dict) -> list:
        gate.wait(10)
        sizes.append(len(items))
        return [x * 2 for x in items]

    return sizes, gate, run


def _busy_with_one(b: Batcher):
    """One request that starts at once and blocks in the pipeline until the gate opens; returns its future."""
    first = b.submit([0], {})
    while not b.busy:
        threading.Event().wait(0.005)
    return first


def test_a_lone_request_does_not_wait_for_company():
    """max_wait_ms of 10 s: a lone client's request must not sit out the wait (it did before: 10 s here)."""
    sizes, gate, run = _recording()
    gate.set()
    b = Batcher(run, max_batch_size=8, max_wait_ms=10_000)
    try:
        for i in range(3):  # one client, one request after another
            assert b.submit([i], {}).result(timeout=5).results == [i * 2]
        assert sizes == [1, 1, 1]
    finally:
        b.close()


def test_requests_queued_while_a_batch_runs_share_the_next_call():
    sizes, gate, run = _recording()
    b = Batcher(run, max_batch_size=8, max_wait_ms=50)
    try:
        first = _busy_with_one(b)
        rest = [b.submit([i], {}) for i in range(1, 6)]
        gate.set()
        assert first.result(timeout=5).results == [0]
        assert [f.result(timeout=5).results for f in rest] == [[2], [4], [6], [8], [10]]
        assert sizes == [1, 5]  # the five that queued meanwhile: one call
        assert all(f.result().batch_size == 5 for f in rest)
    finally:
        b.close()


def test_different_parameters_never_share_a_call():
    sizes, gate, run = _recording()
    b = Batcher(run, max_batch_size=8, max_wait_ms=50)
    try:
        first = _busy_with_one(b)
        a = [b.submit([i], {"top_k": 1}) for i in range(2)]
        c = [b.submit([i], {"top_k": 2}) for i in range(3)]
        gate.set()
        for f in [first, *a, *c]:
            f.result(timeout=5)
        assert sorted(sizes) == [1, 2, 3]
    finally:
        b.close()


def test_texts_run_sorted_by_length_in_passes_and_come_back_in_order():
    from tasks.model_api.chunking import forward_inputs, run_by_length

    passes: list[list[str]] = []

    def run(xs: list[str]) -> list[str]:
        passes.append(xs)
        return [x.upper() for x in xs]

    items = ["ccc", "a", "eeeee", "bb", "dddd"]
    assert run_by_length(run, items, 2) == ["CCC", "A", "EEEEE", "BB", "DDDD"]
    assert passes == [["a", "bb"], ["ccc", "dddd"], ["eeeee"]]  # each pass pads to its own longest
    passes.clear()
    dicts = [{"question": "q", "context": "c"}, {"question": "qq", "context": "c"}]
    assert run_by_length(lambda xs: xs, dicts, 1) == dicts  # not texts: one call, untouched
    assert forward_inputs("cpu", 32) == 16 and forward_inputs("cpu", 4) == 4 and forward_inputs("cuda", 32) == 32
