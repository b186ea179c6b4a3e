"""Prefect Block classes: saved, reusable settings with secrets kept as SecretStr.

Register them once with `prefect block register -m blocks`, then create and save them from the UI or
code; the config names a saved block instead of inline settings (`block:TYPE/NAME`).
"""

from __future__ import annotations

from blocks.hub import HubCredentials
from blocks.lmstudio import LMStudioTarget
from blocks.training_host import TrainingHost

BLOCK_TYPES = {cls.get_block_type_slug(): cls for cls in (TrainingHost, HubCredentials, LMStudioTarget)}


def load_block_secret(ref: str) -> str | None:
    """Resolve `TYPE/NAME[.field]` to a secret value from a saved block (for `block:` references).

    TYPE is a block type slug (training-host, hub-credentials, lm-studio-target); the field defaults
    to the block's main secret (private_key or write_token).
    """
    from tasks.core.errors import PermanentError

    type_and_name, _, field = ref.partition(".")
    slug, _, name = type_and_name.partition("/")
    cls = BLOCK_TYPES.get(slug)
    if cls is None or not name:
        raise PermanentError(f"block reference {ref!r} is not TYPE/NAME with TYPE one of {', '.join(BLOCK_TYPES)}")
    try:
        block = cls.load(name)
    except ValueError:
        return None
    field = field or getattr(cls, "_main_secret", "")
    value = getattr(block, field, None)
    if value is None:
        return None
    return value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)


__all__ = ["TrainingHost", "HubCredentials", "LMStudioTarget", "BLOCK_TYPES", "load_block_secret"]
