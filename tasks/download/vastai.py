"""Resolve a vast.ai instance id to the SSH host and port to pull from, through vast.ai's REST API.

One GET of `/instances/{id}/` with the API key as a Bearer token. The instance answers with a direct
address (`public_ipaddr` + the host port mapped to `22/tcp`) when it has one, else vast.ai's SSH proxy
(`ssh_host`, `ssh_port`); the official CLI's `ssh-url` prefers the direct address the same way. This is
a single request, so it is written here with requests rather than pulling in the whole `vastai` CLI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from tasks.core.errors import PermanentError, TransientError

log = logging.getLogger("loraship.download")


@dataclass
class VastInstance:
    instance_id: int
    host: str
    port: int
    status: str
    via: str  # direct | proxy


def resolve_instance(
    instance_id: int, api_key: SecretStr, api_url: str, timeout: float = 30.0, via: str = "auto"
) -> VastInstance:
    """SSH host and port of a running vast.ai instance (TransientError while it is still starting)."""
    import requests

    url = f"{api_url.rstrip('/')}/instances/{instance_id}/"
    try:
        resp = requests.get(
            url,
            headers={"Authorization": f"Bearer {api_key.get_secret_value()}", "Accept": "application/json"},
            timeout=timeout,
        )
    except requests.RequestException as exc:
        raise TransientError(f"vast.ai API at {api_url} did not answer: {type(exc).__name__}") from None
    if resp.status_code in (401, 403):
        raise PermanentError(
            f"vast.ai refused the API key ({resp.status_code})",
            hint="check source.vastai_api_key (a reference such as env:VAST_API_KEY)",
        )
    if resp.status_code == 404:
        raise PermanentError(
            f"vast.ai has no instance {instance_id} on this account",
            hint="check source.instance_id (`vastai show instances`)",
        )
    if resp.status_code >= 500 or resp.status_code == 429:
        raise TransientError(f"vast.ai API answered {resp.status_code}")
    if resp.status_code != 200:
        raise PermanentError(f"vast.ai API answered {resp.status_code} for instance {instance_id}")
    try:
        body = resp.json()
    except ValueError:
        raise TransientError("vast.ai API answered with something that is not JSON") from None
    inst: Any = body.get("instances", body) if isinstance(body, dict) else None
    if isinstance(inst, list):
        inst = next((i for i in inst if i.get("id") == instance_id), inst[0] if len(inst) == 1 else None)
    if not isinstance(inst, dict) or not inst:
        raise PermanentError(f"vast.ai returned no record for instance {instance_id}", hint="check source.instance_id")
    status = str(inst.get("actual_status") or inst.get("cur_state") or "unknown")
    if status in ("exited", "stopped", "offline"):
        raise PermanentError(
            f"vast.ai instance {instance_id} is {status}",
            hint="start the instance (its disk keeps the training output) and run again",
        )
    if status != "running":
        raise TransientError(f"vast.ai instance {instance_id} is {status}, not running yet")
    direct = (inst.get("ports") or {}).get("22/tcp")
    if direct and inst.get("public_ipaddr") and via in ("auto", "direct"):
        host, port, how = str(inst["public_ipaddr"]).strip(), int(direct[0]["HostPort"]), "direct"
    elif inst.get("ssh_host") and inst.get("ssh_port") and via in ("auto", "proxy"):
        host, port, how = str(inst["ssh_host"]), int(inst["ssh_port"]), "proxy"
    else:
        raise PermanentError(
            f"vast.ai instance {instance_id} has no SSH address ({via})",
            hint="was it started with SSH access (runtype ssh)?",
        )
    log.info("vast.ai instance %s: %s, ssh %s:%s (%s)", instance_id, status, host, port, how)
    return VastInstance(instance_id=instance_id, host=host, port=port, status=status, via=how)
