"""Where llama.cpp's converter comes from: the same llama.cpp commit as the installed llama-cpp-python.

Quantize, generation checks and serving use llama-cpp-python (pinned); its wheel carries no converter.
The converter (`convert_hf_to_gguf.py` + its `conversion/` package + its own `gguf-py`) must come from
the SAME llama.cpp commit, or it may write metadata the runtime does not read. It is resolved, in order:

1. a llama.cpp checkout the user names (`convert.llama_cpp_dir`, else the `LLAMA_CPP_DIR` variable);
2. a copy cached in the user cache folder (`~/.cache/loraship/llama.cpp/llama-cpp-python-<version>`);
3. the sdist of the installed llama-cpp-python version from the package registry
   (`pip download --no-binary :all: --no-deps`): its `vendor/llama.cpp` holds the converter, and the
   submodule's HEAD names the commit;
4. a git clone of llama-cpp-python at the version's tag with its llama.cpp submodule (network allowing).

2-4 fill the cache once, under a file lock and built in a temporary folder renamed into place, so two
flows at once cannot corrupt it. The converter's code is never copied into this repository; only the
files it needs are extracted (about 2 MB). No library does this resolution, hence this module.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from tasks.core.atomic import atomic_dir
from tasks.core.constants import cache_root
from tasks.core.errors import PermanentError, TransientError

log = logging.getLogger("loraship.convert")

# llama.cpp commits vendored by llama-cpp-python releases we have checked (a user checkout at another
# commit gets a warning: its converter may write metadata this runtime does not know).
KNOWN_COMMITS: dict[str, str] = {"0.3.36": "0c1e57098bba43ac29e6e3b677cdceebdd22334f"}
# What the converter needs from a llama.cpp tree (conversion/ is new upstream; older trees have one file).
NEEDED = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py", "LICENSE")
REPO_URL = "https://github.com/abetlen/llama-cpp-python"


@dataclass(frozen=True)
class Converter:
    """A resolved llama.cpp converter tree."""

    root: Path
    commit: str | None
    origin: str  # checkout | cache | sdist | git
    runtime_version: str | None = None
    notes: list[str] = field(default_factory=list, compare=False)

    @property
    def script(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    @property
    def lora_script(self) -> Path:
        return self.root / "convert_lora_to_gguf.py"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for the converter subprocess: ITS gguf-py first (PyPI gguf is too old for it)."""
        env = dict(os.environ if base is None else base)
        paths = [str(self.root / "gguf-py"), str(self.root)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env.pop("NO_LOCAL_GGUF", None)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def describe(self) -> str:
        c = self.commit[:9] if self.commit else "unknown commit"
        return f"llama.cpp {c} ({self.origin}: {self.root})"


def installed_runtime_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise PermanentError(
            "llama-cpp-python is not installed; convert and quantize need it",
            hint=(
                'install it: CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" pip install '
                "llama-cpp-python==0.3.36 (./setup.sh does)"
            ),
        ) from None


def gpu_layers() -> int:
    """How many layers llama.cpp puts on the GPU when it loads a model to run it (serve, evaluate): every one
    (-1) when this llama-cpp-python was built with GPU offload (setup.sh's CUDA build), else none. Quantize
    never offloads: llama.cpp quantizes on the CPU."""
    import llama_cpp

    return -1 if llama_cpp.llama_supports_gpu_offload() else 0


def cache_folder() -> Path:

    return cache_root() / "llama.cpp"


def _is_tree(root: Path) -> bool:
    return (root / "convert_hf_to_gguf.py").is_file() and (root / "gguf-py" / "gguf").is_dir()


def _git_commit(root: Path) -> str | None:
    """HEAD of a checkout (a real .git folder, or a submodule's `gitdir:` file)."""
    if shutil.which("git"):
        try:
            out = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
            )
            if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", out.stdout.strip()):
                return out.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    git = root / ".git"
    head: Path | None = None
    if git.is_dir():
        head = git / "HEAD"
    elif git.is_file():
        m = re.match(r"gitdir:\s*(.+)", git.read_text().strip())
        if m:
            head = (root / m.group(1)).resolve() / "HEAD"
    if head is not None and head.is_file():
        text = head.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{40}", text):
            return text
        ref = text.removeprefix("ref: ").strip()
        ref_file = head.parent / ref
        if ref_file.is_file():
            return ref_file.read_text().strip()
    return None


def resolve_converter(
    llama_cpp_dir: str | Path | None = None, *, allow_download: bool = True, environ: dict[str, str] | None = None
) -> Converter:
    """The converter tree to use (see the module docstring for the order)."""
    env = os.environ if environ is None else environ
    version = installed_runtime_version()
    named = llama_cpp_dir or env.get("LLAMA_CPP_DIR")
    if named:
        return _checkout(named, "convert.llama_cpp_dir" if llama_cpp_dir else "LLAMA_CPP_DIR", version)
    return _cached_converter(version, allow_download)


def _checkout(named: str | Path, where: str, version: str) -> Converter:
    """A llama.cpp checkout the user named; a commit other than the runtime's is a note and a warning."""
    expected = KNOWN_COMMITS.get(version)
    root = Path(named).expanduser().resolve()
    if not _is_tree(root):
        raise PermanentError(
            f"{where}={root} is not a llama.cpp checkout (no convert_hf_to_gguf.py and gguf-py/ there)",
            hint=(
                f"point {where} at the root of a llama.cpp clone, or unset it to use the converter of the "
                f"installed llama-cpp-python {version}"
            ),
        )
    commit = _git_commit(root)
    conv = Converter(root=root, commit=commit, origin="checkout", runtime_version=version)
    if expected and commit and commit != expected:
        msg = (
            f"{where} is at llama.cpp {commit[:9]} but llama-cpp-python {version} runs {expected[:9]}: "
            "files it writes may use metadata this runtime does not read"
        )
        log.warning(msg)
        conv.notes.append(msg)
    return conv


def _cached_converter(version: str, allow_download: bool) -> Converter:
    """The converter of the installed runtime's version from the cache, else fetched once (sdist, then git)
    under a file lock so parallel runs fetch it once."""
    folder = cache_folder() / f"llama-cpp-python-{version}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock", timeout=1800):
        marker = folder / ".complete"
        if marker.is_file() and _is_tree(folder):
            return Converter(
                root=folder, commit=marker.read_text().strip() or None, origin="cache", runtime_version=version
            )
        if not allow_download:
            raise PermanentError(
                f"no llama.cpp converter for llama-cpp-python {version} in {folder}",
                hint=(
                    "set convert.llama_cpp_dir (or LLAMA_CPP_DIR) to a llama.cpp checkout, or allow the one-time "
                    "download of the llama-cpp-python sdist"
                ),
            )
        errors: list[str] = []
        for origin, fetch in (("sdist", _fetch_from_sdist), ("git", _fetch_from_git)):
            try:
                with atomic_dir(folder) as tmp:
                    commit = fetch(version, tmp)
                    (tmp / ".complete").write_text((commit or "") + "\n")
                log.info(
                    "llama.cpp converter for llama-cpp-python %s (commit %s) cached in %s from the %s",
                    version,
                    (commit or "?")[:9],
                    folder,
                    origin,
                )
                return Converter(root=folder, commit=commit, origin=origin, runtime_version=version)
            except Exception as exc:  # try the next source; report them all if none works
                errors.append(f"{origin}: {exc}")
                log.warning("could not get the converter from the %s: %s", origin, exc)
    raise TransientError(
        f"could not obtain llama.cpp's converter for llama-cpp-python {version}: " + "; ".join(errors),
        hint=(
            "check the network access to the package registry, or set convert.llama_cpp_dir (or "
            "LLAMA_CPP_DIR) to a llama.cpp checkout"
        ),
    )


def download_sdist(version: str, into: Path) -> Path:
    """The llama-cpp-python `version` sdist, downloaded into `into` by pip (pip's cache makes a second call cheap).

    Shared with tasks/gguf/llama_tools.py, which builds llama.cpp's tools from the same archive.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-binary",
        ":all:",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
        str(into),
        f"llama-cpp-python=={version}",
    ]
    log.info("downloading the llama-cpp-python %s sdist (about 75 MB; pip caches it)", version)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError("pip download failed: " + " | ".join((out.stderr or out.stdout).strip().splitlines()[-3:]))
    archives = sorted(Path(into).glob("*.tar.gz"))
    if not archives:
        raise RuntimeError("pip download produced no sdist")
    return archives[0]


def _fetch_from_sdist(version: str, dest: Path) -> str | None:
    with tempfile.TemporaryDirectory(prefix="loraship-sdist-") as tmpd:
        return extract_sdist(download_sdist(version, Path(tmpd)), dest)


VENDORED = "vendor/llama.cpp/"


def extract_vendored(archive: Path, dest: Path, keep: Callable[[str], bool]) -> tuple[str | None, int]:
    """Extract what `keep` accepts of a llama-cpp-python sdist's vendor/llama.cpp into `dest` (paths relative to
    vendor/llama.cpp); return (the vendored llama.cpp commit, read from the submodule's HEAD, or None; files)."""
    commit: str | None = None
    members = []
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            parts = m.name.split("/", 1)
            if len(parts) < 2:
                continue
            rel = parts[1]
            if rel == ".git/modules/vendor/llama.cpp/HEAD" and m.isfile():
                fh = tar.extractfile(m)
                text = fh.read().decode().strip() if fh else ""
                commit = text if re.fullmatch(r"[0-9a-f]{40}", text) else None
                continue
            if not rel.startswith(VENDORED) or not (m.isfile() or m.isdir()):
                continue
            inner = rel[len(VENDORED) :]
            if keep(inner):
                m.name = inner
                members.append(m)
        tar.extractall(dest, members=members, filter="data")
    return commit, sum(m.isfile() for m in members)


def extract_sdist(archive: Path, dest: Path) -> str | None:
    """Extract the converter files of vendor/llama.cpp from a llama-cpp-python sdist; return the commit."""
    commit, wanted = extract_vendored(
        archive, dest, lambda inner: any(inner == n or inner.startswith(n + "/") for n in NEEDED)
    )
    if not _is_tree(dest):
        raise RuntimeError(f"{archive.name} has no vendor/llama.cpp/convert_hf_to_gguf.py with gguf-py")
    log.debug("extracted %d converter files from %s", wanted, archive.name)
    return commit


def _fetch_from_git(version: str, dest: Path) -> str | None:
    if not shutil.which("git"):
        raise RuntimeError("git is not installed")
    with tempfile.TemporaryDirectory(prefix="loraship-git-") as tmpd:
        repo = Path(tmpd) / "llama-cpp-python"
        cmd = [
            "git",
            "clone",
            "--depth",
            "1",
            "--branch",
            f"v{version}",
            "--recurse-submodules",
            "--shallow-submodules",
            REPO_URL,
            str(repo),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError("git clone failed: " + " | ".join(out.stderr.strip().splitlines()[-3:]))
        src = repo / "vendor" / "llama.cpp"
        commit = _git_commit(src)
        for name in NEEDED:
            p = src / name
            if p.is_dir():
                shutil.copytree(p, dest / name)
            elif p.is_file():
                shutil.copy2(p, dest / name)
        if not _is_tree(dest):
            raise RuntimeError("the clone has no vendor/llama.cpp converter")
        return commit
