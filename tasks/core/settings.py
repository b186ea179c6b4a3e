"""Shared pieces of the config schema: a strict base model and secret references.

Secrets are never inline values in deployment_config.yaml: a secret field holds a *reference*, either
`env:VAR` (an environment variable), `secret:NAME` (a Prefect Secret block) or `block:TYPE/NAME` (a field
of a saved Prefect block), and is resolved to a SecretStr only when a stage needs it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, SecretStr, model_validator

from tasks.core.constants import cache_root
from tasks.core.errors import PermanentError
from tasks.core.hashing import content_digest, digest_of, git_head
from tasks.core.scrub import register_secret


def check_hub_id(value: str, field: str, derived_from: str) -> str:
    """A Hub repo id is 'owner/name'; empty means "derive it" (used by hub.repo_id and space.space_id)."""
    if value and (value.count("/") != 1 or not all(value.split("/"))):
        raise ValueError(f"{field} is 'owner/name' (or empty to derive it from {derived_from})")
    return value


@dataclass(frozen=True)
class ContentKey:
    """Marks a path setting whose CONTENTS belong to the cache key: `Annotated[str | None, FILE_CONTENT]`.

    A path alone does not change when the file behind it does (an edited card template, a new imatrix), so
    the cache policy (tasks/core/caching.py) keys such a field by the sha256 of the file (`file`) or the
    commit of the git checkout (`git`) it names, besides its value.
    """

    kind: Literal["file", "git"] = "file"

    def digest(self, value: Any) -> str:
        if self.kind == "file":
            return content_digest(str(value))
        commit = git_head(str(value))  # a tree without .git (an unpacked sdist): its top-level scripts
        return commit or digest_of(sorted(content_digest(p) for p in Path(str(value)).expanduser().glob("*.py")))


FILE_CONTENT = ContentKey("file")
GIT_CHECKOUT = ContentKey("git")

_SALT_FILE = ".secret-salt"
_process_salt = secrets.token_bytes(32)


def _salt() -> bytes:
    """A random key kept in the user's cache folder (0600), so fingerprints match across runs and machines
    cannot be compared; without a writable cache folder, a per-process one."""
    path = cache_root() / _SALT_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
            return path.read_bytes()
        except FileExistsError:
            return path.read_bytes()
        except OSError:
            return _process_salt
    except OSError:
        return _process_salt


def secret_fingerprint(value: Any) -> str:
    """A keyed digest (HMAC-SHA256 with a local random key) that changes when the secret does, and from which
    the secret cannot be found: for cache keys, so a rotated token makes the stage that uses it run again."""
    text = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
    return hmac.new(_salt(), text.encode(), hashlib.sha256).hexdigest()[:32]


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


_REF = re.compile(r"^(env|secret|block):([A-Za-z0-9_./-]+)$")


class SecretRef(BaseModel):
    """Where a secret lives: an environment variable, a Prefect Secret, or a saved block."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str  # env | secret | block
    name: str

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, SecretRef):
            return value
        if isinstance(value, dict):
            if len(value) == 1 and next(iter(value)) in ("env", "secret", "block"):
                k, v = next(iter(value.items()))
                return {"source": k, "name": v}
            return value
        if isinstance(value, str):
            m = _REF.match(value.strip())
            if m:
                return {"source": m.group(1), "name": m.group(2)}
            raise ValueError(
                "secrets are never written inline; write a reference instead: "
                "'env:HF_TOKEN' (an environment variable), 'secret:hf-token' (a Prefect Secret block) "
                "or 'block:hub-credentials/my-creds'"
            )
        raise ValueError("expected a secret reference such as 'env:HF_TOKEN' or 'secret:hf-token'")

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"

    def resolve(self, required: bool = True) -> SecretStr | None:
        """The secret's value, or None when it is not set and not `required`."""
        value: str | None = None
        if self.source == "env":
            value = os.environ.get(self.name) or None
        elif self.source == "secret":
            try:
                from prefect.blocks.system import Secret

                value = str(Secret.load(self.name).get())
            except ValueError:
                value = None
        elif self.source == "block":
            from blocks import load_block_secret

            value = load_block_secret(self.name)
        if value is None and required:
            where = {"env": "environment variable", "secret": "Prefect Secret block", "block": "Prefect block"}[
                self.source
            ]
            raise PermanentError(
                f"the {where} {self.name!r} is not set",
                hint=f"set it, or point the config at another reference than {self}",
            )
        if value is None:
            return None
        register_secret(value)  # from now on scrubbed from every message, log and notification
        return SecretStr(value)

    def model_dump_ref(self) -> str:
        return str(self)
