"""llama.cpp's tools built from the vendored source: the cached build runs, names its commit, and is found or refused.

The build itself (cmake + Ninja, ~4-5 minutes on 2 cores) runs in `./setup.sh --test` (and `--llama-tools`); these
tests use that cached build, the real binaries. The source extraction is checked on a small tarball with the
sdist's layout built here (the real sdist is 77 MB).
"""

from __future__ import annotations

import io
import subprocess
import tarfile

import pytest

import tasks.gguf.llama_tools as lt
from tasks.core.errors import PermanentError
from tasks.gguf.toolchain import KNOWN_COMMITS

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("tool", lt.TARGETS)
def test_the_cached_tools_run_and_name_the_runtimes_commit(tool):
    path = lt.llama_tool(tool, build=False)  # built by ./setup.sh --test
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert KNOWN_COMMITS["0.3.36"][:9] in out.stdout + out.stderr  # the same llama.cpp as llama-cpp-python
    assert lt.cached_tools().commit == KNOWN_COMMITS["0.3.36"]


def test_missing_build_is_refused_with_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASHIP_CACHE", str(tmp_path))
    with pytest.raises(PermanentError) as err:
        lt.llama_tool("llama-perplexity", build=False)
    assert "setup.sh --llama-tools" in err.value.hint
    with pytest.raises(PermanentError, match="not one of"):
        lt.LlamaTools(tmp_path, None, "0.3.36").path("llama-server")


def test_vendored_source_is_extracted_without_what_the_build_does_not_read(tmp_path):
    files = {
        "llama_cpp_python-9.9.9/.git/modules/vendor/llama.cpp/HEAD": COMMIT + "\n",
        "llama_cpp_python-9.9.9/vendor/llama.cpp/CMakeLists.txt": "project(x)\n",
        "llama_cpp_python-9.9.9/vendor/llama.cpp/tools/perplexity/CMakeLists.txt": "\n",
        "llama_cpp_python-9.9.9/vendor/llama.cpp/models/ggml-vocab-llama.gguf": "x" * 100,
        "llama_cpp_python-9.9.9/vendor/llama.cpp/docs/build.md": "\n",
        "llama_cpp_python-9.9.9/llama_cpp/__init__.py": "",
    }
    sdist = tmp_path / "s.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    root, commit = lt._vendored_source(sdist, tmp_path / "src")
    assert commit == COMMIT and (root / "tools/perplexity/CMakeLists.txt").is_file()
    assert not (root / "models").exists() and not (root / "docs").exists() and not (root / "llama_cpp").exists()
    with pytest.raises(PermanentError, match="not a llama-cpp-python sdist"):
        (tmp_path / "empty").mkdir()
        broken = tmp_path / "b.tar.gz"
        with tarfile.open(broken, "w:gz"):
            pass
        lt._vendored_source(broken, tmp_path / "empty")


def test_the_build_key_follows_targets_and_options(monkeypatch):
    key = lt.build_key()
    monkeypatch.setattr(lt, "TARGETS", (*lt.TARGETS, "llama-bench"))
    assert lt.build_key() != key and lt.tools_folder("0.3.36").name.startswith("tools-0.3.36-")
