"""How setup.sh builds llama-cpp-python: CPU as always, CUDA where a toolkit is found, in its own cached wheel.

No GPU or CUDA toolkit here: the toolkit is an `nvcc` script on PATH that answers `--version` as nvcc does
(and `nvidia-smi -L` one that lists a GPU), and setup.sh runs with a stand-in for the virtual environment's
python that records every command (a real build takes minutes and the CUDA one a toolkit); the detection
itself is the real module, run by that stand-in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.support.llama_build import CPU_CMAKE_ARGS, LLAMA_CPP_PYTHON, detect, plan_lines

ROOT = Path(__file__).resolve().parents[1]
NVCC = """#!/bin/sh
echo "nvcc: NVIDIA (R) Cuda compiler driver"
echo "Cuda compilation tools, release 12.4, V12.4.131"
"""
SMI = """#!/bin/sh
echo "GPU 0: NVIDIA H200 (UUID: GPU-00000000-0000-0000-0000-000000000000)"
"""


def _bin(tmp_path: Path, **tools: str) -> Path:
    b = tmp_path / "bin"
    b.mkdir(parents=True, exist_ok=True)
    for name, text in tools.items():
        (b / name.replace("_", "-")).write_text(text)
        (b / name.replace("_", "-")).chmod(0o755)
    return b


def _env(tmp_path: Path, **tools: str) -> dict[str, str]:
    """PATH with only these tools; no /usr/local/cuda to fall back on (this machine has one)."""
    return {"PATH": str(_bin(tmp_path, **tools)), "LORASHIP_CUDA_DEFAULT_HOME": str(tmp_path / "no-cuda")}


def _assignments(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        if "=" in line and not line.startswith("echo"):
            k, v = line.split("=", 1)
            out[k] = v.strip("'")
    return out


def test_a_toolkit_and_a_gpu_mean_the_cuda_build_in_its_own_wheel_folder(tmp_path: Path) -> None:
    det = detect(_env(tmp_path, nvcc=NVCC, nvidia_smi=SMI))
    assert det.build == "cuda" and det.cuda_version == "12.4" and det.nvcc.endswith("bin/nvcc")
    assert "NVIDIA H200" in det.gpu
    plan = _assignments(plan_lines(det, cache=tmp_path / "cache"))
    assert plan["LLAMA_BUILD"] == "cuda"
    assert "-DGGML_CUDA=on" in plan["LLAMA_CMAKE_ARGS"] and CPU_CMAKE_ARGS in plan["LLAMA_CMAKE_ARGS"]
    assert "-DCMAKE_CUDA_ARCHITECTURES=native" in plan["LLAMA_CMAKE_ARGS"]  # this GPU's arch only
    wheels = tmp_path / "cache" / "wheels"
    assert plan["LLAMA_WHEEL_DIR"] == str(wheels / f"llama-cpp-python-{LLAMA_CPP_PYTHON}-cuda12.4")


def test_a_toolkit_without_a_gpu_keeps_the_cpu_build(tmp_path: Path) -> None:
    """This project's CPU machines have nvcc 13.0 and no GPU: a CUDA build would not even import here."""
    det = detect(_env(tmp_path, nvcc=NVCC))
    assert det.build == "cpu" and det.cuda_version == "12.4"
    assert "no NVIDIA GPU" in det.notes[0]
    plan = _assignments(plan_lines(det))
    assert plan == {
        "LLAMA_BUILD": "cpu",
        "LLAMA_CMAKE_ARGS": CPU_CMAKE_ARGS,
        "LLAMA_WHEEL_DIR": "",
        "LLAMA_CPP_PYTHON": LLAMA_CPP_PYTHON,
    }
    assert any("no NVIDIA GPU" in line for line in plan_lines(det) if line.startswith("echo"))
    assert detect(_env(tmp_path / "none")).notes == []  # nothing at all: the CPU build, nothing to say


def test_a_gpu_without_a_toolkit_says_what_to_install(tmp_path: Path) -> None:
    det = detect(_env(tmp_path, nvidia_smi=SMI))
    assert det.build == "cpu" and det.nvcc is None
    assert "no CUDA toolkit (nvcc) was found" in det.notes[0] and "NVIDIA H200" in det.notes[0]


def test_loraship_cuda_forces_either_way(tmp_path: Path) -> None:
    assert detect({**_env(tmp_path, nvcc=NVCC, nvidia_smi=SMI), "LORASHIP_CUDA": "0"}).build == "cpu"
    assert detect({**_env(tmp_path, nvcc=NVCC), "LORASHIP_CUDA": "1"}).build == "cuda"  # a build box
    with pytest.raises(SystemExit, match="LORASHIP_CUDA=1 asks for the CUDA build"):
        detect({**_env(tmp_path / "empty"), "LORASHIP_CUDA": "1"})


# --- setup.sh itself ------------------------------------------------------------------------------------------

# The virtual environment's python, standing in: records each command; runs the real detection; "builds" a
# wheel file where `pip wheel -w DIR` says; llama_cpp is not installed yet.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "CMD $* | CMAKE_ARGS=${CMAKE_ARGS:-}" >> "$FAKE_LOG"
case "$*" in
  *"-m tasks.support.llama_build"*) exec "$REAL_PYTHON" "$@" ;;
  *"llama_supports_gpu_offload"*|*"-c import llama_cpp") exit 1 ;;
  *"pip wheel"*)
    while [ $# -gt 0 ]; do
      if [ "$1" = "-w" ]; then mkdir -p "$2"; touch "$2/llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl"; fi
      shift
    done
    exit 0 ;;
  *) exit 0 ;;
esac
"""


def _setup(tmp_path: Path, tools: dict[str, str]) -> list[str]:
    """Run setup.sh with the stand-in python and these tools on PATH; the commands it ran."""
    work = tmp_path / "checkout"
    (work / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(ROOT / "setup.sh", work / "setup.sh")
    (work / ".venv" / "bin" / "python").write_text(FAKE_PYTHON)
    (work / ".venv" / "bin" / "python").chmod(0o755)
    log = tmp_path / "commands.log"
    fake_bin = _bin(tmp_path, **tools)
    env = {
        **os.environ,
        "PATH": f"{fake_bin}:/usr/bin:/bin",
        "FAKE_LOG": str(log),
        "REAL_PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
        "LORASHIP_CACHE": str(tmp_path / "cache"),
        "LORASHIP_CUDA_DEFAULT_HOME": str(tmp_path / "no-cuda"),
    }
    env.pop("CMAKE_ARGS", None)
    env.pop("LORASHIP_CUDA", None)
    out = subprocess.run(["bash", "setup.sh"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return log.read_text().splitlines()


def test_setup_builds_the_cuda_wheel_into_its_own_folder_and_installs_it(tmp_path: Path) -> None:
    cmds = _setup(tmp_path, {"nvcc": NVCC, "nvidia_smi": SMI})
    wheel_dir = tmp_path / "cache" / "wheels" / "llama-cpp-python-0.3.36-cuda12.4"
    (wheel,) = [c for c in cmds if "pip wheel" in c]
    assert "--no-binary llama-cpp-python" in wheel and f"-w {wheel_dir}" in wheel and "--no-cache-dir" in wheel
    assert "-DGGML_CUDA=on" in wheel.split("CMAKE_ARGS=")[1]
    installs = [c for c in cmds if "pip install" in c and "llama" in c]
    assert any(f"--force-reinstall --no-deps {wheel_dir}/llama_cpp_python-0.3.36-" in c for c in installs)
    assert any("--only-binary llama-cpp-python" in c and f"--find-links {wheel_dir}" in c for c in installs)


@pytest.mark.parametrize("tools", [{}, {"nvcc": NVCC}], ids=["nothing", "toolkit-no-gpu"])
def test_setup_without_a_cuda_machine_builds_for_the_cpu_as_before(tmp_path: Path, tools: dict[str, str]) -> None:
    cmds = _setup(tmp_path, tools)
    assert not [c for c in cmds if "pip wheel" in c]
    (install,) = [c for c in cmds if "pip install" in c and "llama-cpp-python" in c]
    assert "llama-cpp-python[server]==0.3.36" in install and install.endswith(f"CMAKE_ARGS={CPU_CMAKE_ARGS}")


def test_setup_llama_build_plan_only_prints_the_plan(tmp_path: Path) -> None:
    env = {
        **os.environ,
        **_env(tmp_path, nvcc=NVCC, nvidia_smi=SMI),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
    }
    env["PATH"] += ":/usr/bin:/bin"
    env.pop("CMAKE_ARGS", None)
    out = subprocess.run(
        ["bash", str(ROOT / "setup.sh"), "--llama-build-plan"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "LLAMA_BUILD=cuda" in out.stdout and "-DGGML_CUDA=on" in out.stdout
    assert "==" not in out.stdout + out.stderr  # nothing installed, nothing built


# --- where models run -----------------------------------------------------------------------------------------


def test_served_and_evaluated_models_put_every_layer_on_the_gpu_of_a_gpu_build(llama_ggufs, monkeypatch) -> None:
    """This build is a CPU one (no layer offloaded); with the build's offload answer turned to yes, the serve app
    and the evaluation's loader ask llama.cpp for every layer on the GPU (a CPU build ignores the request)."""
    import llama_cpp
    from starlette.testclient import TestClient

    from tasks.evaluate.windows import load_llama
    from tasks.gguf.toolchain import gpu_layers
    from tasks.serve.app import build_app

    assert gpu_layers() == (-1 if llama_cpp.llama_supports_gpu_offload() else 0)
    assert load_llama(llama_ggufs["Q8_0"], 64).model_params.n_gpu_layers == gpu_layers()
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    # -1 (all layers), as llama-cpp-python passes it on to llama.cpp
    assert load_llama(llama_ggufs["Q8_0"], 64).model_params.n_gpu_layers == 2**31 - 1
    app = build_app(str(llama_ggufs["Q8_0"]), "tiny-Q8_0", {}, n_ctx=64)
    with TestClient(app) as client:
        assert client.get("/info").json()["gpu_layers"] == -1
