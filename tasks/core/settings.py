"""Shared pieces of the config schema: a strict base model and secret references.

Secrets are never inline values in deployment_config.yaml: a secret field holds a *reference*, either
`env:VAR` (an environment variable), `secret:NAME` (a Prefect Secret block) or `block:TYPE/NAME` (a field
of a saved Prefect block), and is resolved to a SecretStr only when a stage needs it.
"""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr, model_validator

from tasks.core.errors import PermanentError
from tasks.core.scrub import register_secret


def check_hub_id(value: str, field: str, derived_from: str) -> str:
    """A Hub repo id is 'owner/name'; empty means "derive it" (used by hub.repo_id and space.space_id)."""
    if value and (value.count("/") != 1 or not all(value.split("/"))):
        raise ValueError(f"{field} is 'owner/name' (or empty to derive it from {derived_from})")
    return value


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
