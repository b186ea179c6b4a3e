"""One run per run folder, and a folder a crash cannot corrupt: atomic_dir's exchange, the run lock,
leftover partials and orphaned servers of a killed run (tasks/core/atomic.py, tasks/core/runlock.py)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tasks.core import atomic
from tasks.core.atomic import atomic_dir
from tasks.core.run import RunFolder
from tasks.core.runlock import RunFolderBusy, claim_run_folder, process_start, recover_run_folder

ROOT = Path(__file__).resolve().parents[1]


def test_atomic_dir_never_leaves_a_moment_without_the_final_folder(tmp_path, monkeypatch):
    """Every rename atomic_dir makes leaves the final folder in place (complete, old or new)."""
    final = tmp_path / "merged"
    final.mkdir()
    (final / "weights").write_text("old")
    seen: list[bool] = []
    for name in ("replace", "rename"):
        real = getattr(os, name)

        def probe(src, dst, *a, _real=real, **kw):
            out = _real(src, dst, *a, **kw)
            seen.append(final.is_dir() and (final / "weights").is_file())
            return out

        monkeypatch.setattr(atomic.os, name, probe)
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("new")
    assert (final / "weights").read_text() == "new"
    assert all(seen), f"the final folder was missing after a rename: {seen}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"], "the old folder is deleted"


def test_two_writers_never_lose_the_final_folder(tmp_path):
    """Writers racing on one folder: each finishes, the final folder is always there and always whole."""
    final = tmp_path / "gguf"
    errors: list[BaseException] = []
    gaps: list[str] = []
    stop = threading.Event()

    def writer(tag: str) -> None:
        try:
            for i in range(150):
                with atomic_dir(final) as tmp:
                    (tmp / "a").write_text(f"{tag}{i}")
                    (tmp / "b").write_text(f"{tag}{i}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    def read(fd: int, name: str) -> str:
        with open(name, opener=lambda p, f: os.open(p, f, dir_fd=fd)) as fh:
            return fh.read()

    def reader() -> None:  # one folder version at a time: opened once, its files read through that handle
        while not stop.is_set():
            try:
                fd = os.open(final, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                gaps.append("missing")
                continue
            try:
                a, b = read(fd, "a"), read(fd, "b")
                if a != b:
                    gaps.append(f"{a}/{b}")
            except FileNotFoundError:
                pass  # this version was superseded and deleted while we read it: not a gap
            finally:
                os.close(fd)

    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("x")
        (tmp / "b").write_text("x")
    threads = [threading.Thread(target=writer, args=(t,)) for t in "PQ"]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert not errors, f"a writer failed: {errors[:3]}"
    assert not gaps, f"the final folder was missing or mixed: {gaps[:5]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gguf"]


def _holder_script(root: Path, flag: Path) -> str:
    return (
        "import sys, time, pathlib\n"
        "from tasks.core.runlock import claim_run_folder\n"
        f"lease = claim_run_folder(pathlib.Path({str(root)!r}), flow_run_id='run-one-1234')\n"
        "print('HELD', flush=True)\n"
        f"while not pathlib.Path({str(flag)!r}).exists(): time.sleep(0.05)\n"
        "lease.release()\n"
    )


def test_a_second_run_fails_at_once_naming_the_holder(tmp_path):
    root = tmp_path / "runs" / "m" / "v1"
    flag = tmp_path / "release"
    proc = subprocess.Popen(
        [sys.executable, "-c", _holder_script(root, flag)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "HELD"
        with pytest.raises(RunFolderBusy) as err:
            claim_run_folder(root, flow_run_id="run-two")
        text = str(err.value)
        assert "run-one-1234" in text and f"pid {proc.pid}" in text and socket.gethostname() in text
        assert "since" in text
    finally:
        flag.write_text("go")
        proc.wait(timeout=60)
    lease = claim_run_folder(root, flow_run_id="run-two")  # free again once the first let go
    lease.release()


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    root = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root.mkdir()
    (root / ".run.lock").write_text(
        json.dumps({"flow_run_id": "crashed-run", "host": socket.gethostname(), "pid": dead.pid, "since": "earlier"})
    )
    with caplog.at_level(logging.WARNING, logger="loraship.run"):
        lease = claim_run_folder(root, flow_run_id="next")
    try:
        assert "crashed-run" in caplog.text and str(dead.pid) in caplog.text
        held = json.loads((root / ".run.lock").read_text())
        assert held["flow_run_id"] == "next" and held["pid"] == os.getpid()
        with pytest.raises(RunFolderBusy):  # and it is held now, also against this same process
            claim_run_folder(root, flow_run_id="third")
    finally:
        lease.release()


def test_recovery_removes_partials_but_keeps_resumable_downloads(tmp_path):
    run = RunFolder(tmp_path / "run", "m", "v1").ensure()
    (run.root / ".partial-1a2b3c4d-merged").mkdir()
    (run.root / ".partial-1a2b3c4d-merged" / "model.safetensors").write_bytes(b"x" * 100)
    run.gguf_dir.mkdir()
    (run.gguf_dir / ".partial-9f8e7d6c-m-Q4_K_M.gguf").write_bytes(b"y" * 100)
    (run.gguf_dir / "m-Q8_0.gguf").write_bytes(b"final")
    (run.adapter_dir / ".partial-rsync").mkdir(parents=True)
    (run.adapter_dir / ".partial-rsync" / "adapter_model.safetensors").write_bytes(b"half a transfer")
    report = recover_run_folder(run)
    assert sorted(Path(p).name for p in report.removed) == [
        ".partial-1a2b3c4d-merged",
        ".partial-9f8e7d6c-m-Q4_K_M.gguf",
    ]
    assert (run.gguf_dir / "m-Q8_0.gguf").read_bytes() == b"final"
    assert (run.adapter_dir / ".partial-rsync" / "adapter_model.safetensors").exists(), "rsync resumes from it"


def _sleeper(tmp_path: Path, name: str) -> subprocess.Popen:
    """A stand-in server process (a real process; its record is what the serve stage writes)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)


def _record(run: RunFolder, quant: str, proc: subprocess.Popen, owner_pid: int, keep: bool) -> None:
    (run.reports_dir / f"serve-{quant}.json").write_text(
        json.dumps(
            {
                "pid": proc.pid,
                "port": 8100,
                "process_start": process_start(proc.pid),
                "owner_pid": owner_pid,
                "keep": keep,
            }
        )
    )


def test_recovery_stops_servers_of_a_killed_run_only(tmp_path):
    run = RunFolder(tmp_path / "run", "m", "v1").ensure()
    dead_owner = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_owner.wait()
    orphan, kept, reused = (_sleeper(tmp_path, n) for n in ("orphan", "kept", "reused"))
    try:
        _record(run, "Q4_K_M", orphan, dead_owner.pid, keep=False)
        _record(run, "Q8_0", kept, dead_owner.pid, keep=True)  # serving.keep_running: left alone
        (run.reports_dir / "serve-F16.json").write_text(  # the pid now belongs to another process
            json.dumps({"pid": reused.pid, "port": 8101, "process_start": "ticks:1", "owner_pid": dead_owner.pid})
        )
        report = recover_run_folder(run)
        assert report.stopped == [orphan.pid]
        assert orphan.wait(timeout=30) is not None
        assert kept.poll() is None and reused.poll() is None
    finally:
        for p in (orphan, kept, reused):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_second_flow_on_a_run_folder_in_use_fails_at_once_naming_the_first(tmp_path, prefect_api, monkeypatch):
    """Two real `full` flow runs on one model and version: the second starts while the first is inside its
    download stage (from that stage, as a sub-flow), fails before any stage naming the first, and the
    first completes; afterwards the folder is free."""
    from flows import runners
    from flows.full import full

    seen: dict[str, str] = {}

    def probe(ctx):
        second = full(config=cfg, return_state=True)
        seen["second"] = second.name
        seen["message"] = second.message or ""
        return []

    monkeypatch.setitem(runners.RUNNERS, "download", probe)
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    cfg = {
        "model": {"name": "locked", "version": "v1"},
        "source": {"kind": "local", "path": str(src)},
        "pipeline": {"runs_dir": str(tmp_path / "runs"), "stages": ["download"]},
    }
    state = full(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    assert seen["second"] == "Failed" and "is in use by flow run" in seen["message"]
    assert str(state.state_details.flow_run_id) in seen["message"] and f"pid {os.getpid()}" in seen["message"]
    lease = claim_run_folder(tmp_path / "runs" / "locked" / "v1", flow_run_id="after")  # released at the end
    lease.release()
