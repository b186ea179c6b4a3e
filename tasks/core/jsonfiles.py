"""Reading JSON files, the two ways the pipeline needs.

`read_json`: an input the stage cannot do without (adapter_config.json, a model's config.json, a shard
index): a missing or damaged file is a PermanentError naming the file and what to do. `read_json_or`:
something optional (training records, a base's config found in a cache): missing, unreadable, oversized
(a stray multi-GB file is not metadata) or invalid all give the default, so a card or a summary is still
made without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.core.errors import PermanentError

#: Larger than any metadata file: a bigger one is not read (see read_json_or).
MAX_METADATA_BYTES = 64 << 20


def read_json(path: Path | str) -> Any:
    """The parsed file; PermanentError when it is missing or not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PermanentError(f"{path} is missing", hint=f"point the setting at a folder that has {path.name}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PermanentError(f"{path} is not valid JSON ({exc})", hint="the file is damaged: copy it again") from None


def read_json_or(path: Path | str | None, default: Any = None, *, max_bytes: int = MAX_METADATA_BYTES) -> Any:
    """The parsed file, or `default` when there is no path, no file, an unreadable, oversized or invalid one."""
    if not path:
        return default
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size >= max_bytes:
            return default
        return json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError):
        return default


def read_json_dict(path: Path | str | None) -> dict[str, Any]:
    """`read_json_or` for a file that should hold an object: anything else (or nothing) is `{}`."""
    data = read_json_or(path, {})
    return data if isinstance(data, dict) else {}
