"""Helpers for the model-API tests: a deployment's real app served by uvicorn on loopback in a thread.

The per-task tests use the same app `python -m tasks.model_api.server` runs (create_app + uvicorn), on a
socket bound to a free port, inside the test process: one process imports torch/transformers once for
eleven tasks. The deploy tests start real server subprocesses through tasks/model_api/deploy.py.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import requests

from tasks.model_api.settings import Device, DType, ServerSpec


def spec_for(task: str, model: Path, **over: Any) -> ServerSpec:
    base: dict[str, Any] = dict(
        deployment_id=f"test-{task}",
        name=f"test-{task}",
        model_id=str(model),
        model_path=str(model),
        task=task,
        host="127.0.0.1",
        port=0,
        device=Device.CPU,
        dtype=DType.AUTO,
        max_batch_size=8,
        max_wait_ms=5.0,
        max_input_tokens=64,
        registry_path="",
    )
    return ServerSpec(**{**base, **over})


class LocalServer:
    """create_app(spec) on 127.0.0.1:<free port>; `load` True loads before serving (tests then need no wait)."""

    def __init__(self, spec: ServerSpec, load: bool = True):
        import uvicorn

        from tasks.model_api.server import create_app

        self.app = create_app(spec, None, load=False)
        self.state = self.app.state.model_api
        if load:
            self.state.load()
            assert self.state.status == "ready", self.state.error
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.url}/health", timeout=1)
                return
            except requests.RequestException:
                time.sleep(0.05)
        raise RuntimeError("the in-process server did not start")

    def predict(self, body: dict[str, Any], timeout: float = 120) -> requests.Response:
        return requests.post(f"{self.url}/predict", json=body, timeout=timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
        if self.state.batcher is not None:
            self.state.batcher.close()
