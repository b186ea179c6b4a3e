"""Training side: tell the Prefect server that a fine-tune finished (`training.completed`).

    python -m deployments.notify --model my-model --host gpu-box --path /workspace/out/final \\
        --api-url http://prefect.example:4200/api          # auth: $PREFECT_API_AUTH_STRING (user:password)

The event goes to the server's events endpoint (`POST <api>/events`, HTTP basic auth with the string
the server was started with, PREFECT_SERVER_API_AUTH_STRING). The `loraship-on-training` deployment's
trigger turns it into a flow run with the payload as parameters (deployments/prefect.yaml).

Standard library only, on purpose: the training box need not have loraship or prefect installed; this
file can be copied there alone. The equivalent curl one-liner is printed by `--print-curl`.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from typing import Any

EVENT = "training.completed"


def build_event(
    model: str,
    path: str,
    host: str = "",
    source_kind: str = "",
    base_model: str = "",
    version: str = "",
    only: str = "",
    extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The event as the server's /events endpoint takes it (a list of these)."""
    payload: dict[str, str] = {
        "model": model,
        "path": path,
        "host": host,
        "source_kind": source_kind or ("ssh" if host else ""),  # empty: the base config's source kind
        "base_model": base_model,
        "version": version,
        "only": only,
    }
    payload.update(extra or {})
    return {
        "id": str(uuid.uuid4()),
        "occurred": datetime.now(UTC).isoformat(),
        "event": EVENT,
        "resource": {"prefect.resource.id": f"loraship.training.{model}", "prefect.resource.name": model},
        "payload": payload,
    }


def post_event(api_url: str, event: dict[str, Any], auth: str | None = None, timeout: float = 30.0) -> int:
    """POST one event; returns the HTTP status (204 when accepted). Raises urllib errors on refusal."""
    req = urllib.request.Request(
        f"{api_url.rstrip('/')}/events",
        data=json.dumps([event]).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the user's own server URL
        return resp.status


def curl_command(api_url: str, event: dict[str, Any]) -> str:
    """The same request as a curl one-liner (the auth string stays in the environment, never on the line)."""
    body = json.dumps([{k: v for k, v in event.items() if k not in ("id", "occurred")}], separators=(",", ":"))
    return (
        f"curl -fsS -u \"$PREFECT_API_AUTH_STRING\" -H 'Content-Type: application/json' "
        f"-X POST {api_url.rstrip('/')}/events -d '{body}'"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m deployments.notify",
        description=f"Send a {EVENT} event to a Prefect server so the loraship pipeline starts for this training run.",
    )
    p.add_argument("--model", required=True, help="model name (file and folder names)")
    p.add_argument(
        "--path", required=True, help="the training output folder (with adapter_config.json) on the training host"
    )
    p.add_argument(
        "--host",
        default="",
        help="SSH host (or vast.ai instance) the adapter is on; empty: the same machine as the worker",
    )
    p.add_argument(
        "--source-kind",
        default="",
        choices=["", "local", "ssh", "vastai"],
        help="default: ssh with --host, else the base config's (a local source needs trigger.allow_local there)",
    )
    p.add_argument("--base-model", default="", help="base model id or folder (default: from the adapter's config)")
    p.add_argument("--version", default="", help="run folder version (default: the deployment's config)")
    p.add_argument("--only", default="", help="comma-separated stages to run (default: all enabled)")
    p.add_argument(
        "--api-url",
        default=os.environ.get("PREFECT_API_URL", ""),
        help="the Prefect server's API URL (default: $PREFECT_API_URL)",
    )
    p.add_argument(
        "--auth-env",
        default="PREFECT_API_AUTH_STRING",
        help="environment variable holding user:password (default: PREFECT_API_AUTH_STRING)",
    )
    p.add_argument("--print-curl", action="store_true", help="print the equivalent curl command and send nothing")
    args = p.parse_args(argv)
    if not args.api_url:
        print("error: no --api-url and no PREFECT_API_URL (e.g. http://prefect-host:4200/api)", file=sys.stderr)
        return 2
    event = build_event(
        args.model,
        args.path,
        host=args.host,
        source_kind=args.source_kind,
        base_model=args.base_model,
        version=args.version,
        only=args.only,
    )
    if args.print_curl:
        print(curl_command(args.api_url, event))
        return 0
    auth = os.environ.get(args.auth_env) or None
    try:
        status = post_event(args.api_url, event, auth=auth)
    except urllib.error.HTTPError as exc:
        why = (
            "the server refused the credentials: set $"
            + args.auth_env
            + " to the server's PREFECT_SERVER_API_AUTH_STRING"
            if exc.code == 401
            else exc.reason
        )
        print(f"error: {args.api_url}/events answered {exc.code}: {why}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"error: cannot reach {args.api_url}: {exc.reason}", file=sys.stderr)
        return 1
    print(f"sent {EVENT} for {args.model} (event {event['id']}, HTTP {status})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
