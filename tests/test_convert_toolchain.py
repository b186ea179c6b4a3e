"""Converter resolution: sdist extraction, the commit, and the cache filled once under a lock.

The registry download itself (`pip download` of a 75 MB sdist, minutes) is replaced by a small real
tarball with the sdist's layout built here; everything after it (extraction, lock, atomic cache folder)
is the real code.
"""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path

import pytest

import tasks.gguf.toolchain as tc

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_sdist(path: Path, with_converter: bool = True) -> Path:
    files = {
        "llama_cpp_python-9.9.9/.git/modules/vendor/llama.cpp/HEAD": COMMIT + "\n",
        "llama_cpp_python-9.9.9/vendor/llama.cpp/LICENSE": "MIT\n",
        "llama_cpp_python-9.9.9/vendor/llama.cpp/conversion/__init__.py": "",
        "llama_cpp_python-9.9.9/vendor/llama.cpp/gguf-py/gguf/__init__.py": "",
        "llama_cpp_python-9.9.9/vendor/llama.cpp/src/llama.cpp": "// not needed\n",
        "llama_cpp_python-9.9.9/llama_cpp/__init__.py": "",
    }
    if with_converter:
        files["llama_cpp_python-9.9.9/vendor/llama.cpp/convert_hf_to_gguf.py"] = "print('converter')\n"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_sdist_takes_only_the_converter_and_the_commit(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    commit = tc.extract_sdist(_fake_sdist(tmp_path / "s.tar.gz"), dest)
    assert commit == COMMIT
    assert (dest / "convert_hf_to_gguf.py").is_file() and (dest / "gguf-py" / "gguf").is_dir()
    assert not (dest / "src").exists() and not (dest / "llama_cpp").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="no vendor/llama.cpp/convert_hf_to_gguf.py"):
        tc.extract_sdist(_fake_sdist(tmp_path / "bad.tar.gz", with_converter=False), empty)


def test_cache_is_filled_once_under_a_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASHIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    sdist = _fake_sdist(tmp_path / "s.tar.gz")
    calls = []

    def fake_download(version: str, dest: Path) -> str | None:  # stands in for `pip download`
        calls.append(version)
        return tc.extract_sdist(sdist, dest)

    monkeypatch.setattr(tc, "_fetch_from_sdist", fake_download)
    results: list[tc.Converter] = []
    threads = [threading.Thread(target=lambda: results.append(tc.resolve_converter())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1  # the others waited on the lock and found the cache
    assert {r.root for r in results} == {
        tmp_path / "cache" / "llama.cpp" / f"llama-cpp-python-{tc.installed_runtime_version()}"
    }
    assert sorted(r.origin for r in results) == ["cache", "cache", "sdist"]
    assert all(r.commit == COMMIT for r in results)
    assert not [p for p in (tmp_path / "cache" / "llama.cpp").iterdir() if p.name.startswith(".partial-")]


def test_no_download_allowed_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASHIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    with pytest.raises(Exception, match="convert.llama_cpp_dir"):
        tc.resolve_converter(allow_download=False)
