#!/usr/bin/env bash
# Set up loraship in ./.venv: Debian packages (when run as root), CPU torch if no torch is present,
# llama-cpp-python built once (pip caches the wheel), then the project itself.
#   ./setup.sh          what the demo needs
#   ./setup.sh --test   plus what the tests need (sshd, rsync, chromium, pytest, ..., llama.cpp's tools)
#   ./setup.sh --llama-tools   also build llama.cpp's llama-perplexity and llama-imatrix (once, ~5 minutes)
#   ./setup.sh --llama-build-plan   only say how llama-cpp-python would be built here (CPU, or CUDA), install nothing
# With a CUDA toolkit (nvcc) on the machine, llama-cpp-python is built with CUDA into its own cached wheel
# (tasks/support/llama_build.py); LORASHIP_CUDA=0 keeps the CPU build.
set -euo pipefail
cd "$(dirname "$0")"
WANT_TEST=0
WANT_TOOLS=0
PLAN_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --test) WANT_TEST=1; WANT_TOOLS=1 ;;  # the tests compare the evaluation with llama-perplexity
    --llama-tools) WANT_TOOLS=1 ;;
    --llama-build-plan) PLAN_ONLY=1 ;;
    *) echo "setup.sh: unknown option $arg (use --test, --llama-tools, --llama-build-plan)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
if (( PLAN_ONLY )); then
  [[ -x .venv/bin/python ]] && PY=.venv/bin/python
  exec "$PY" -m tasks.support.llama_build plan
fi

# Run an install step quietly; when it fails, show its output and stop (a failed install must never be
# hidden: the tests would then skip or fail far from the cause).
run_step() {
  local what="$1"; shift
  local log; log="$(mktemp)"
  if ! "$@" >"$log" 2>&1; then
    echo "== FAILED: $what" >&2
    echo "   command: $*" >&2
    tail -n 80 "$log" >&2
    rm -f "$log"
    exit 1
  fi
  grep -v "^WARNING: Location" "$log" | grep -E "^(WARNING|ERROR)" >&2 || true  # pip's warnings, if any
  rm -f "$log"
}

apt_install() {
  if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null; then
    local missing=()
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if (( ${#missing[@]} )); then
      echo "== apt-get install ${missing[*]}"
      run_step "apt-get update" apt-get update -qq
      run_step "apt-get install ${missing[*]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
  else
    local missing=()
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if (( ${#missing[@]} )); then
      echo "== not root: install these Debian packages (sudo apt-get install ${missing[*]})" >&2
      (( WANT_TEST )) && exit 1  # the tests need them: stop here rather than fail or skip later
    fi
  fi
}

# golang-go: Go's text/template renders Ollama TEMPLATEs in the chat-template contract (a small Go program,
# standard library only, built once into ~/.cache/loraship/go below; runs need only the built binary).
apt_install rsync openssh-client golang-go
if (( WANT_TOOLS )); then
  apt_install cmake ninja-build g++
fi
if (( WANT_TEST )); then
  apt_install openssh-server chromium chromium-driver espeak-ng  # espeak-ng: the speech the ASR Space test transcribes
fi

if [[ ! -x .venv/bin/python ]]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
run_step "pip install --upgrade pip" "$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "== installing torch (CPU build; bring your own CUDA build for a GPU)"
  run_step "pip install torch==2.13.0" "$VPY" -m pip install -q "torch==2.13.0"
fi
# CPU or CUDA (tasks/support/llama_build.py sets LLAMA_BUILD, LLAMA_CMAKE_ARGS, LLAMA_WHEEL_DIR, LLAMA_CPP_PYTHON)
LLAMA_BUILD=cpu LLAMA_CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF}" LLAMA_WHEEL_DIR="" LLAMA_CPP_PYTHON=0.3.36
LLAMA_PLAN="$("$VPY" -m tasks.support.llama_build plan)" || exit 1  # it said why (LORASHIP_CUDA=1, no toolkit)
eval "$LLAMA_PLAN"
if [[ "$LLAMA_BUILD" == cuda ]]; then
  # pip's wheel cache does not tell a CUDA build from a CPU one: the CUDA wheel lives in its own folder
  if ! "$VPY" -c "import sys, llama_cpp; sys.exit(not llama_cpp.llama_supports_gpu_offload())" 2>/dev/null; then
    if ! compgen -G "$LLAMA_WHEEL_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON-*.whl" >/dev/null; then
      echo "== building llama-cpp-python $LLAMA_CPP_PYTHON with CUDA into $LLAMA_WHEEL_DIR (once)"
      run_step "pip wheel llama-cpp-python==$LLAMA_CPP_PYTHON (CUDA)" env CMAKE_ARGS="$LLAMA_CMAKE_ARGS" \
        "$VPY" -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python -w "$LLAMA_WHEEL_DIR" \
        "llama-cpp-python==$LLAMA_CPP_PYTHON"
    fi
    run_step "pip install the CUDA llama-cpp-python wheel" "$VPY" -m pip install -q --force-reinstall --no-deps \
      "$LLAMA_WHEEL_DIR"/llama_cpp_python-"$LLAMA_CPP_PYTHON"-*.whl
    run_step "pip install llama-cpp-python[server]" "$VPY" -m pip install -q --find-links "$LLAMA_WHEEL_DIR" \
      --only-binary llama-cpp-python "llama-cpp-python[server]==$LLAMA_CPP_PYTHON"
  fi
elif ! "$VPY" -c "import llama_cpp" 2>/dev/null; then
  echo "== building llama-cpp-python $LLAMA_CPP_PYTHON (about 7 minutes the first time; pip caches the wheel)"
  run_step "pip install llama-cpp-python[server]==$LLAMA_CPP_PYTHON" env CMAKE_ARGS="$LLAMA_CMAKE_ARGS" \
    "$VPY" -m pip install -q "llama-cpp-python[server]==$LLAMA_CPP_PYTHON"
fi
EXTRA=""
(( WANT_TEST )) && EXTRA="[test,dask]"
echo "== installing loraship${EXTRA}"
run_step "pip install -e .${EXTRA}" "$VPY" -m pip install -q -e ".${EXTRA}"
if (( WANT_TEST )); then
  # The Dask task runner (performance.task_runner: dask). --no-deps: its own pins would replace this prefect.
  run_step "pip install prefect-dask==0.3.7" "$VPY" -m pip install -q --no-deps "prefect-dask==0.3.7"
fi
# The GGUF converter must come from the runtime's own llama.cpp commit: fetch and cache it now (from
# $LLAMA_CPP_DIR, else the llama-cpp-python sdist on the package registry), so runs need no network.
"$VPY" -c "from tasks.gguf.toolchain import resolve_converter; print('converter:', resolve_converter().describe())"
# The Go program that renders Ollama templates like Ollama (tasks/chat/gorender): built now, offline. Without Go
# the demo still runs (the contract reports Ollama as not checked); the tests need it.
if (( WANT_TEST )); then
  "$VPY" -m tasks.chat.gorender build
else
  "$VPY" -m tasks.chat.gorender build || echo "== note: install golang-go to check Ollama templates (apt-get install golang-go)"
fi
if (( WANT_TOOLS )); then
  # llama.cpp's own tools, from the vendored source of the same llama-cpp-python sdist (cached after the first build)
  for tool in cmake ninja; do
    command -v "$tool" >/dev/null || "$VPY" -m pip install -q "$tool"  # not root: PyPI's builds of them
  done
  PATH="$PWD/.venv/bin:$PATH" "$VPY" -m tasks.gguf.llama_tools build
fi
"$VPY" -c "import flows.full, llama_cpp, torch, prefect; print('loraship ready: torch', torch.__version__, '| llama-cpp-python', llama_cpp.__version__, '| prefect', prefect.__version__)"
