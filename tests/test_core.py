"""Atomic writes, artifacts and the manifest."""

from __future__ import annotations

import json
import os
import threading

import pytest

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_dir, atomic_path, atomic_write_text, remove_partials
from tasks.core.errors import PermanentError, TransientError, is_transient
from tasks.core.run import RunFolder


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    final = tmp_path / "model.gguf"
    final.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert final.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_atomic_write_replaces(tmp_path):
    final = atomic_write_text(tmp_path / "a" / "x.json", "new")
    assert final.read_text() == "new"


def test_atomic_dir_swaps_whole_folder(tmp_path):
    final = tmp_path / "merged"
    final.mkdir()
    (final / "old.safetensors").write_text("old")
    with pytest.raises(ValueError):
        with atomic_dir(final) as tmp:
            (tmp / "new.safetensors").write_text("partial")
            raise ValueError("boom")
    assert sorted(p.name for p in final.iterdir()) == ["old.safetensors"]
    with atomic_dir(final) as tmp:
        (tmp / "new.safetensors").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_remove_partials(tmp_path):
    (tmp_path / ".partial-abc-x").write_text("x")
    (tmp_path / "keep").write_text("x")
    remove_partials(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]


def test_artifact_detects_changes(tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "a.bin").write_bytes(b"1234")
    (d / "b.json").write_text("{}")
    art = Artifact.from_path(d, name="adapter", kind="adapter", stage="download")
    assert art.is_dir and art.size == 6 and art.is_intact()
    same = Artifact.from_path(d, name="adapter", kind="adapter", stage="download")
    assert same.sha256 == art.sha256
    (d / "a.bin").write_bytes(b"4321")  # same size, new content
    os.utime(d / "a.bin", ns=(1, 1))
    assert any("content changed" in p for p in art.problems())
    (d / "b.json").unlink()
    assert any("missing" in p for p in art.problems())


def test_manifest_concurrent_records(tmp_path):
    run = RunFolder.for_model(tmp_path, "m", "v1").ensure()
    files = []
    for i in range(8):
        f = tmp_path / f"f{i}"
        f.write_text(str(i))
        files.append(Artifact.from_path(f, name=f"gguf:{i}", kind="gguf", stage="quantize", tools=["gguf"]))
    threads = [threading.Thread(target=run.record, args=(f"quantize{i}", "done", [a])) for i, a in enumerate(files)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    data = json.loads(run.manifest_path.read_text())
    assert len(data["artifacts"]) == 8 and len(data["stages"]) == 8
    assert data["artifacts"]["gguf:3"]["sha256"] == files[3].sha256
    assert data["tools"]["gguf"]


def test_error_classification():
    import requests

    assert is_transient(TransientError("x"))
    assert not is_transient(PermanentError("x"))
    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    assert not is_transient(FileNotFoundError("missing"))
    assert not is_transient(MemoryError())
    resp = requests.Response()
    resp.status_code = 503
    assert is_transient(requests.HTTPError(response=resp))
    resp.status_code = 401
    assert not is_transient(requests.HTTPError(response=resp))


def test_code_version_covers_helper_modules():
    from tasks.core.caching import _project_imports

    merge = _project_imports("tasks.merge.stage")
    assert {"tasks.merge.plan", "tasks.merge.backends.streaming", "tasks.merge.safetensors_io"} <= merge
    assert not any(m.startswith("tasks.core") for m in merge)
    assert "tasks.gguf.convert_entry" in _project_imports("tasks.gguf.convert")


def test_prune_missing_moves_deleted_artifacts(tmp_path):
    run = RunFolder.for_model(tmp_path, "m", "v1").ensure()
    keep, drop = tmp_path / "keep.gguf", tmp_path / "drop.gguf"
    keep.write_text("k")
    drop.write_text("d")
    arts = [Artifact.from_path(f, name=f.stem, kind="gguf", stage="quantize") for f in (keep, drop)]
    run.record("quantize", "done", arts)
    drop.unlink()
    assert run.prune_missing() == ["drop"]
    m = run.load_manifest()
    assert list(m.artifacts) == ["keep"] and m.removed == {"drop": arts[1].sha256}


def test_code_version_is_thread_safe():
    """Mapped tasks compute cache keys concurrently; every thread must get the same digest."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks.core import caching

    caching._module_code_version.cache_clear()
    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(lambda _: caching.module_code_version("tasks.gguf.quantize"), range(16)))
    assert len(set(versions)) == 1


def test_ssh_errors_are_classified_and_other_errors_never_import_paramiko() -> None:
    import subprocess
    import sys

    import paramiko

    from tasks.core.errors import is_transient

    assert is_transient(paramiko.SSHException("Error reading SSH protocol banner")) is True
    assert is_transient(paramiko.AuthenticationException("bad key")) is False
    code = (
        "import sys; from tasks.core.errors import is_transient; is_transient(ValueError('x'));"
        "print('paramiko' in sys.modules)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
