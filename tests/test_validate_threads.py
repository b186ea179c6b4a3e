"""Validating GGUFs in parallel threads (the mapped quantize tasks) must not lose the process's stdout and
stderr. llama-cpp-python's `Llama(verbose=False)` silences the C library by dup2-ing /dev/null over fds 1
and 2 and restores the saved copies afterwards; two loads overlapping in threads save and restore each
other's /dev/null, and the process then writes its logs and its run summary into nothing (seen as a
`python -m flows.full --json` run that ended with exit code 0 and no summary)."""

from __future__ import annotations

import os
import threading

from tasks.gguf.validate import generate_check


def test_parallel_generate_checks_keep_stdout_and_stderr(llama_ggufs):
    before = [os.fstat(fd) for fd in (1, 2)]
    errors: list[BaseException] = []

    def work(path) -> None:
        try:
            for _ in range(3):
                generate_check(path, n_tokens=1)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(llama_ggufs[q],)) for q in ("Q4_K_M", "Q5_K_M", "Q8_0", "F16")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    after = [os.fstat(fd) for fd in (1, 2)]
    assert all(os.path.samestat(a, b) for a, b in zip(before, after)), "fd 1/2 no longer point where they did"
