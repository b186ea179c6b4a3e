"""llama.cpp's own command-line tools (llama-perplexity, llama-imatrix), built once from the runtime's source.

The llama-cpp-python wheel carries the llama library, not the tools. Its sdist vendors the whole llama.cpp
tree of the same commit (`vendor/llama.cpp/tools/perplexity/`, `tools/imatrix/`), so the tools are built
from there: so they compute with exactly the code that quantizes and serves the files. Built with Ninja,
`GGML_NATIVE=OFF` (the flags the runtime was built with: portable binaries, same kernels), `LLAMA_CURL=OFF`,
`LLAMA_OPENSSL=OFF`, tests/examples/server off, static libraries (the binaries need nothing from the build
folder, which is deleted), and only the targets in `TARGETS`, in one build (about 5 minutes on 2 cores).

The result is cached in `~/.cache/loraship/llama.cpp/tools-<version>-<key>/` (`$LORASHIP_CACHE`; the key covers
TARGETS and CMAKE_OPTIONS, so adding a tool rebuilds), built under a file lock in a temporary folder renamed
into place, so two processes never build it twice or see half of it.
Set-up builds it ahead of time (`./setup.sh --llama-tools`, or `python -m tasks.gguf.llama_tools build`);
`llama_tool("llama-perplexity")` returns the binary, building it first when allowed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from tasks.core.atomic import atomic_dir
from tasks.core.errors import PermanentError
from tasks.gguf.toolchain import (
    KNOWN_COMMITS,
    cache_folder,
    download_sdist,
    extract_vendored,
    installed_runtime_version,
)

log = logging.getLogger("loraship.llama_tools")

#: The tools built, all in one build (issue 21's imatrix reuses the same build).
TARGETS: tuple[str, ...] = ("llama-perplexity", "llama-imatrix")
#: cmake options: the runtime's portability flags, nothing but the tools' libraries, no network code.
CMAKE_OPTIONS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
)
#: Parts of the vendored tree the build does not read (the vocabulary GGUFs alone are 75 MB).
SKIP_DIRS = ("models", "docs", "media", ".github", "tests", "examples", "pocs", "benches")
MARKER = ".complete"


@dataclass(frozen=True)
class LlamaTools:
    """A folder of built llama.cpp tools and the llama.cpp commit they were built from."""

    root: Path
    commit: str | None
    version: str

    def path(self, name: str) -> Path:
        if name not in TARGETS:
            raise PermanentError(
                f"{name!r} is not one of the llama.cpp tools loraship builds ({', '.join(TARGETS)})",
                hint="add it to tasks.gguf.llama_tools.TARGETS",
            )
        return self.root / "bin" / name


def build_key() -> str:
    """What the build depends on besides the version: the targets and the cmake options (a change rebuilds)."""
    return hashlib.sha256(json.dumps([TARGETS, CMAKE_OPTIONS]).encode()).hexdigest()[:8]


def tools_folder(version: str | None = None) -> Path:
    return cache_folder() / f"tools-{version or installed_runtime_version()}-{build_key()}"


def cached_tools(version: str | None = None) -> LlamaTools | None:
    """The built tools when the cache holds a complete build (never builds)."""
    version = version or installed_runtime_version()
    folder = tools_folder(version)
    marker = folder / MARKER
    if marker.is_file() and all((folder / "bin" / t).is_file() for t in TARGETS):
        return LlamaTools(folder, marker.read_text().strip() or None, version)
    return None


def ensure_tools(*, build: bool = True, source_dir: Path | None = None, jobs: int | None = None) -> LlamaTools:
    """The cached tools, built first (under the lock) when missing and `build` is allowed."""
    version = installed_runtime_version()
    found = cached_tools(version)
    if found is not None:
        return found
    if not build:
        raise PermanentError(
            f"llama.cpp's tools ({', '.join(TARGETS)}) are not built for llama-cpp-python {version}",
            hint="run ./setup.sh --llama-tools (or python -m tasks.gguf.llama_tools build): about 5 minutes once",
        )
    folder = tools_folder(version)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock", timeout=3600):
        found = cached_tools(version)  # built by another process while we waited
        if found is not None:
            return found
        with atomic_dir(folder) as tmp:
            tmp.chmod(0o755)  # a shared cache: readable by every user of the machine
            commit = _build_into(tmp, version, source_dir, jobs)
            (tmp / MARKER).write_text((commit or "") + "\n")
    found = cached_tools(version)
    assert found is not None
    return found


def llama_tool(name: str, *, build: bool = True) -> Path:
    """The path of one of llama.cpp's tools (`llama-perplexity`, `llama-imatrix`), built from the runtime's source."""
    return ensure_tools(build=build).path(name)


# --- building ---------------------------------------------------------------------------------------------


def _build_into(dest: Path, version: str, source_dir: Path | None, jobs: int | None) -> str | None:
    """Configure and build TARGETS; copy the binaries to dest/bin. Returns the llama.cpp commit."""
    for tool in ("cmake", "ninja"):
        if not shutil.which(tool):
            raise PermanentError(
                f"building llama.cpp's tools needs {tool}, which is not on PATH",
                hint="install it: apt-get install cmake ninja-build (or pip install cmake ninja)",
            )
    with tempfile.TemporaryDirectory(prefix="loraship-llama-tools-") as tmpd:
        work = Path(tmpd)
        if source_dir is not None:
            src, commit = Path(source_dir), None
        else:
            src, commit = _vendored_source(download_sdist(version, work / "sdist"), work / "src")
        build = work / "build"
        started = time.monotonic()
        # the commit is baked in so `llama-perplexity --version` names it (the extracted tree has no .git)
        stamp = [f"-DLLAMA_BUILD_COMMIT={commit[:9]}"] if commit else []
        _run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", *CMAKE_OPTIONS, *stamp], "cmake configure")
        n = jobs or os.cpu_count() or 1
        _run(["cmake", "--build", str(build), "--target", *TARGETS, "-j", str(n)], "cmake --build", progress=True)
        (dest / "bin").mkdir(parents=True)
        for t in TARGETS:
            built = build / "bin" / t
            if not built.is_file():
                raise PermanentError(f"the llama.cpp build made no {t} (looked in {built})")
            shutil.copy2(built, dest / "bin" / t)
            _run([str(dest / "bin" / t), "--version"], f"{t} --version")
        log.info(
            "built %s from llama.cpp %s in %.0f s (%d jobs) into %s",
            ", ".join(TARGETS),
            (commit or "?")[:9],
            time.monotonic() - started,
            n,
            dest,
        )
    if commit and KNOWN_COMMITS.get(version) not in (None, commit):
        log.warning(
            "the llama-cpp-python %s sdist vendors llama.cpp %s, not the known %s",
            version,
            commit,
            KNOWN_COMMITS[version],
        )
    return commit


def _vendored_source(archive: Path, dest: Path) -> tuple[Path, str | None]:
    """Extract the sdist's vendor/llama.cpp (less what the build does not read); return (root, commit)."""
    commit, _ = extract_vendored(archive, dest, lambda inner: inner.split("/", 1)[0] not in SKIP_DIRS)
    if not (dest / "tools" / "perplexity" / "CMakeLists.txt").is_file():
        raise PermanentError(f"{archive.name} has no vendor/llama.cpp/tools/perplexity: not a llama-cpp-python sdist")
    return dest, commit


def _run(cmd: list[str], what: str, progress: bool = False) -> None:
    """Run a build step; its output goes to the log (ninja's [n/N] lines at INFO every tenth), the tail to errors."""
    tail: list[str] = []
    last_decile = -1
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-30:]
            m = re.match(r"\[(\d+)/(\d+)\]", line)
            if progress and m and int(m[2]):
                decile = 10 * int(m[1]) // int(m[2])
                if decile > last_decile:
                    last_decile = decile
                    log.info("building llama.cpp tools: %s/%s steps", m[1], m[2])
            log.debug("%s", line)
    if proc.returncode != 0:
        raise PermanentError(
            f"{what} failed (exit {proc.returncode}): " + " | ".join(tail[-8:]),
            hint="see the build output above; cmake >= 3.14, ninja and a C++17 compiler are needed",
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.gguf.llama_tools", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (once) and cache llama-perplexity and llama-imatrix")
    b.add_argument("--source", type=Path, help="a llama.cpp checkout to build from (default: the sdist)")
    b.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    sub.add_parser("where", help="print the cached tools' folder (exit 1 when not built)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "where":
        found = cached_tools()
        print(found.root if found else "not built")
        return 0 if found else 1
    tools = ensure_tools(source_dir=args.source, jobs=args.jobs)
    print(f"llama.cpp tools ({', '.join(TARGETS)}): {tools.root} (llama.cpp {(tools.commit or '?')[:9]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
