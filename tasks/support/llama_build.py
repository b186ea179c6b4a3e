"""How setup.sh builds llama-cpp-python on this machine: for the CPU (as always), or with CUDA where there is one.

    python -m tasks.support.llama_build detect      # JSON: what was found, and the build it leads to
    python -m tasks.support.llama_build plan        # shell assignments setup.sh evaluates

The CUDA build needs a CUDA toolkit (nvcc and its headers: found through $CUDACXX, $CUDA_HOME, $CUDA_PATH,
`nvcc` on PATH or /usr/local/cuda) and a GPU with its driver (`nvidia-smi -L` lists one, or torch sees one): a
CUDA build of llama.cpp links the driver's libcuda and does not even import on a machine without it, and
toolkits are often installed on machines without a GPU (this project's CPU machines have nvcc 13.0). A
toolkit, a CUDA torch (its wheel ships the runtime, not nvcc) or a GPU alone is reported, and the build stays
the CPU one with a note saying what is missing. `LORASHIP_CUDA=0` forces the CPU build; `LORASHIP_CUDA=1`
asks for the CUDA one with a toolkit and no GPU (a build box for GPU machines), and fails without a toolkit.

Why a separate wheel folder: pip caches built wheels by the sdist's URL, not by CMAKE_ARGS, so a CUDA build
and a CPU build of the same version would replace each other in pip's cache (a CPU wheel handed to a GPU
machine, or the reverse). The CUDA wheel is built with `pip wheel` into its own folder, named by the
llama-cpp-python version and the CUDA version, and installed from there; the CPU path is unchanged.

Standard library only (torch is looked at when importable): setup.sh runs this before installing the project.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
CPU_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"  # what setup.sh has always used (DESIGN.md: ~7 min on 2 cores)
CUDA_CMAKE_ARGS = CPU_CMAKE_ARGS + " -DGGML_CUDA=on"
_RELEASE = re.compile(r"release (\d+\.\d+)")


@dataclass
class Detection:
    """What this machine has for a CUDA build of llama.cpp, and the build that follows from it."""

    build: str  # "cuda" or "cpu"
    nvcc: str | None = None  # path of the CUDA compiler found
    cuda_version: str | None = None  # from `nvcc --version` ("12.4")
    torch_cuda: str | None = None  # torch.version.cuda of the installed torch (None: CPU torch or no torch)
    gpu: str | None = None  # first line of nvidia-smi's GPU list
    forced: str | None = None  # LORASHIP_CUDA as given
    notes: list[str] = field(default_factory=list)


def _nvcc_candidates(env: dict[str, str]) -> list[Path]:
    found: list[Path] = []
    if env.get("CUDACXX"):
        found.append(Path(env["CUDACXX"]))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            found.append(Path(env[var]) / "bin" / "nvcc")
    on_path = shutil.which("nvcc", path=env.get("PATH", ""))
    if on_path:
        found.append(Path(on_path))
    found.append(Path(env.get("LORASHIP_CUDA_DEFAULT_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    return found


def nvcc_version(nvcc: Path) -> str | None:
    """The CUDA release `nvcc --version` reports ("12.4"), or None when it does not run."""
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = _RELEASE.search(out.stdout + out.stderr)
    return m.group(1) if out.returncode == 0 and m else None


def _torch_cuda() -> tuple[str | None, bool]:
    """(the CUDA version torch was built for, whether it sees a GPU)."""
    try:
        import torch

        return getattr(torch.version, "cuda", None), bool(torch.cuda.is_available())
    except Exception:  # no torch yet, or a broken one: nothing to learn from it
        return None, False


def _gpu(env: dict[str, str]) -> str | None:
    smi = shutil.which("nvidia-smi", path=env.get("PATH", ""))
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    return lines[0].strip() if out.returncode == 0 and lines else None


def detect(env: dict[str, str] | None = None) -> Detection:
    """Look for a CUDA toolkit and a GPU (and, for the notes, a CUDA torch); decide the build."""
    env = dict(os.environ if env is None else env)
    forced = env.get("LORASHIP_CUDA", "").strip().lower() or None
    nvcc = next(((p, v) for p in _nvcc_candidates(env) if p.is_file() and (v := nvcc_version(p))), None)
    torch_cuda, torch_gpu = _torch_cuda()
    gpu = _gpu(env) or ("a GPU torch sees" if torch_gpu else None)
    det = Detection(
        build="cpu",
        nvcc=str(nvcc[0]) if nvcc else None,
        cuda_version=nvcc[1] if nvcc else None,
        torch_cuda=torch_cuda,
        gpu=gpu,
        forced=forced,
    )
    on = forced in ("1", "on", "true", "yes", "cuda")
    if forced in ("0", "off", "false", "no", "cpu"):
        det.notes.append("LORASHIP_CUDA=0: the CPU build")
    elif nvcc and (gpu or on):
        det.build = "cuda"
    elif on:
        raise SystemExit(
            "LORASHIP_CUDA=1 asks for the CUDA build of llama-cpp-python, but no CUDA toolkit was found (looked "
            "at $CUDACXX, $CUDA_HOME/bin/nvcc, $CUDA_PATH/bin/nvcc, nvcc on PATH, /usr/local/cuda/bin/nvcc)"
        )
    elif nvcc:
        det.notes.append(
            f"a CUDA toolkit (nvcc {det.cuda_version}) but no NVIDIA GPU (nvidia-smi lists none): llama.cpp is "
            "built for the CPU (LORASHIP_CUDA=1 builds for CUDA anyway, for another machine)"
        )
    elif torch_cuda or gpu:
        seen = " and ".join(x for x in (f"torch built for CUDA {torch_cuda}" if torch_cuda else "", gpu or "") if x)
        det.notes.append(
            f"{seen}, but no CUDA toolkit (nvcc) was found: llama.cpp is built for the CPU. Install the CUDA "
            "toolkit (or set CUDA_HOME) and run setup.sh again for the CUDA build"
        )
    return det


def wheel_dir(det: Detection, cache: Path | None = None) -> Path:
    """Where the CUDA wheel is kept: one folder per llama-cpp-python version and CUDA version."""
    root = cache or Path(os.environ.get("LORASHIP_CACHE") or Path.home() / ".cache" / "loraship")
    return root / "wheels" / f"llama-cpp-python-{LLAMA_CPP_PYTHON}-cuda{det.cuda_version}"


def plan_lines(det: Detection, cache: Path | None = None, cmake_args: str | None = None) -> list[str]:
    """Shell assignments for setup.sh: LLAMA_BUILD, LLAMA_CMAKE_ARGS, LLAMA_WHEEL_DIR (empty for the CPU)."""
    if det.build == "cuda":
        args = cmake_args or CUDA_CMAKE_ARGS
        if "GGML_CUDA" not in args:
            args += " -DGGML_CUDA=on"
        if det.gpu and "CMAKE_CUDA_ARCHITECTURES" not in args:
            args += " -DCMAKE_CUDA_ARCHITECTURES=native"  # only this GPU's: a build for every arch takes far longer
        where = str(wheel_dir(det, cache))
    else:
        args, where = cmake_args or CPU_CMAKE_ARGS, ""
    lines = [
        f"LLAMA_BUILD={det.build}",
        f"LLAMA_CMAKE_ARGS={shlex.quote(args)}",
        f"LLAMA_WHEEL_DIR={shlex.quote(where)}",
        f"LLAMA_CPP_PYTHON={LLAMA_CPP_PYTHON}",
    ]
    lines += [f"echo {shlex.quote('== note: ' + n)} >&2" for n in det.notes]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    cmd = args[0] if args else "detect"
    det = detect()
    if cmd == "detect":
        print(json.dumps(asdict(det), indent=2))
    elif cmd == "plan":
        print("\n".join(plan_lines(det, cmake_args=os.environ.get("CMAKE_ARGS") or None)))
    else:
        print(f"usage: python -m tasks.support.llama_build [detect|plan] (not {cmd!r})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
