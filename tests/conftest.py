"""Shared fixtures: tiny but real models built locally (cached across sessions), a Prefect test API.

Environment set here, before any test imports prefect or huggingface_hub: a private PREFECT_HOME,
no telemetry, no Xet (tests talk to local servers only).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Under CI=true a skipped test fails the run (a missing browser or Dask must not turn modules green).
from tests.ci_skips import (  # noqa: F401 - pytest hooks, found by name
    pytest_collectreport,
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="loraship-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_SESSION_TMP / "prefect-home"))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HOME", str(_SESSION_TMP / "hf-home"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "loraship")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # plain stage functions log outside flows


@pytest.fixture(scope="session")
def llama_base() -> Path:
    """Llama-style causal LM, SentencePiece tokenizer trained here, chat template, hidden_size 256."""
    from tasks.support.tiny_models import tiny_model

    return tiny_model("llama", hidden=256)


@pytest.fixture(scope="session")
def qwen2_base() -> Path:
    """Qwen2-style causal LM, byte-level BPE tokenizer trained here (unknown to llama.cpp: needs vocab_pre)."""
    from tasks.support.tiny_models import tiny_model

    return tiny_model("qwen2", hidden=256)


@pytest.fixture(scope="session")
def llama_chat_base() -> Path:
    """The demo's base: llama_base's shape with a legacy tokenizer and a ChatML template that writes the BOS,
    so transformers, llama.cpp and Ollama give the same tokens (the template contract passes on it)."""
    from tasks.support.tiny_models import tiny_model

    return tiny_model("llama", hidden=256, tokenizer_legacy=True, bos_in_template=True)


@pytest.fixture(scope="session")
def llama_adapter(llama_base: Path) -> Path:
    """A peft LoRA adapter for llama_base with non-zero B (so merging changes outputs)."""
    from tasks.support.tiny_models import tiny_adapter

    return tiny_adapter(llama_base)


@pytest.fixture(scope="session")
def qwen2_adapter(qwen2_base: Path) -> Path:
    from tasks.support.tiny_models import tiny_adapter

    return tiny_adapter(qwen2_base)


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect test API for the whole session (it takes 20-30 s to start here)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def ssh_server():
    """A real OpenSSH server (Debian's sshd) on 127.0.0.1, key login for the current user (tests/sshd.py)."""
    from tests.sshd import SshServer

    server = SshServer(_SESSION_TMP / "sshd").start()
    yield server
    server.cleanup()


# --- Hub (issue 6): a local Hub-compatible server; nothing in the tests may reach huggingface.co ---
# huggingface_hub reads HF_ENDPOINT at import time: point any call that does not name an endpoint at a
# closed local port, so a stray call fails fast instead of going to the internet.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture
def hub_server(tmp_path):
    """A fresh local Hub (tests/hub_server.py) with users alice (write token `hf_write_alice`, read token
    `hf_read_alice`) and bob (`hf_write_bob`). Pass `hub_server.url` as the endpoint."""
    from tests.hub_server import HubServer

    srv = HubServer(tmp_path / "hub").start()
    srv.state.add_token("hf_write_alice", "alice", "write")
    srv.state.add_token("hf_read_alice", "alice", "read")
    srv.state.add_token("hf_write_bob", "bob", "write")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def llama_ggufs(llama_base: Path) -> dict[str, Path]:
    """llama_base converted and quantized by the convert/quantize stages: {"F16", "Q8_0", "Q4_K_M", "Q5_K_M": path}.

    Built once into ~/.cache/loraship/ggufs (keyed on the model, the stage code and llama-cpp-python's
    version); the files are shared: copy one before changing it.
    """
    from tests.gguf_helpers import tiny_ggufs

    return tiny_ggufs(llama_base, name="llama")


@pytest.fixture(scope="session")
def llama_chat_ggufs(llama_chat_base: Path) -> dict[str, Path]:
    """llama_chat_base as {"F16", "Q8_0", "Q4_K_M", "Q5_K_M": path} (built once, cached like llama_ggufs)."""
    from tests.gguf_helpers import tiny_ggufs

    return tiny_ggufs(llama_chat_base, name="llama-chat")


@pytest.fixture(scope="session")
def qwen2_ggufs(qwen2_base: Path) -> dict[str, Path]:
    """qwen2_base (byte-level BPE, converted with vocab_pre 'qwen2') as {"F16", "Q8_0", "Q4_K_M", "Q5_K_M": path}."""
    from tests.gguf_helpers import tiny_ggufs

    return tiny_ggufs(qwen2_base, name="qwen2", vocab_pre="qwen2")
