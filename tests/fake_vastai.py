"""A local HTTP server that answers like vast.ai's REST API for the one call the download stage makes.

`GET /api/v0/instances/<id>/` with `Authorization: Bearer <key>` answers `{"instances": {...}}` with the
fields the official CLI's ssh-url reads (`actual_status`, `public_ipaddr`, `ports["22/tcp"]`, `ssh_host`,
`ssh_port`); 401 on a wrong key, 404 for an unknown id. vast.ai cannot be reached from tests, so this is
the stand-in; the requests it received are kept in `calls` for assertions.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeVastAI:
    def __init__(self, api_key: str):
        self.api_key = api_key
        self.instances: dict[int, dict[str, Any]] = {}
        self.calls: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                outer.calls.append(
                    {"path": self.path, "auth_ok": self.headers.get("Authorization") == f"Bearer {outer.api_key}"}
                )
                if self.headers.get("Authorization") != f"Bearer {outer.api_key}":
                    return self._send(401, {"success": False, "error": "invalid_api_key", "msg": "Invalid user key"})
                parts = [p for p in self.path.split("?")[0].split("/") if p]
                if len(parts) == 4 and parts[:3] == ["api", "v0", "instances"] and parts[3].isdigit():
                    inst = outer.instances.get(int(parts[3]))
                    if inst is None:
                        return self._send(404, {"success": False, "error": "no_such_instance"})
                    return self._send(200, {"instances": inst})
                self._send(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/v0"

    def add_instance(self, instance_id: int, *, ssh_port: int, status: str = "running", direct: bool = True) -> None:
        inst: dict[str, Any] = {
            "id": instance_id,
            "actual_status": status,
            "ssh_host": "127.0.0.1",
            "ssh_port": ssh_port,
            "image_runtype": "ssh",
            "gpu_name": "RTX 4090",
        }
        if direct:
            inst.update(
                {
                    "public_ipaddr": "127.0.0.1\n",
                    "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(ssh_port)}]},
                }
            )
        else:
            inst.update({"public_ipaddr": "203.0.113.9", "ports": {}})
        self.instances[instance_id] = inst

    def __enter__(self) -> FakeVastAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
