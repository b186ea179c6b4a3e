"""The quantization types, written once: one row per llama.cpp file type in tasks/data/quant_types.json.

Like gguf-py's `constants.py` (`LlamaFileType`, `GGML_QUANT_SIZES`), this is vocabulary as data: the name a
user writes, llama.cpp's ftype value, the ggml tensor type the file is built on and its nominal bits per
weight, the measured relative CPU cost of quantizing to it, the card's display rank, whether it is an
unquantized float type, whether it is made and recommended by default, and one line of advice. Every
consumer asks this table instead of branching on names: config validation (`parse_quant`, `check_quant`),
the quantize plan (`cpu_cost`), validation (`base_type`, bits per weight), the card (`display_key`,
`recommended`), evaluate (`precision_key`), hub push, local deploy and cleanup (`is_float`).

Adding a type llama.cpp gained is one row in the JSON; tests/test_quant_types.py fails while the installed
llama.cpp knows an ftype the table lacks. `python -m benchmarks.quant_costs --write` re-measures the
`cpu_cost` column in place (`save_cpu_costs`).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

from tasks.core.atomic import atomic_write_text
from tasks.core.constants import TASKS_DATA
from tasks.core.errors import ConfigError

TABLE_FILE: Path = TASKS_DATA / "quant_types.json"
#: What an unmeasured type costs: a K-quant mixture's work.
FALLBACK_COST_TYPE = "Q4_K_M"


@dataclass(frozen=True)
class QuantType:
    """One llama.cpp file type (a row of tasks/data/quant_types.json; the columns are documented there)."""

    name: str
    ftype: int
    base_type: str
    bits_per_weight: float | None
    cpu_cost: float | None
    rank: int
    is_float: bool
    recommended: bool
    advice: str


def _read(path: Path = TABLE_FILE) -> dict[str, Any]:
    return json.loads(path.read_text())


@cache
def quant_types() -> Mapping[str, QuantType]:
    """The table by name, in display order (rank)."""
    rows = [QuantType(**row) for row in _read()["types"]]
    return {q.name: q for q in sorted(rows, key=lambda q: q.rank)}


def names() -> tuple[str, ...]:
    return tuple(quant_types())


def get(name: str) -> QuantType | None:
    """The row for `name` (any case, surrounding blanks ignored), or None."""
    return quant_types().get(str(name).strip().upper())


def unknown_message(name: str) -> str:
    q = str(name).strip().upper()
    close = difflib.get_close_matches(q, list(quant_types()), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown quantization type {name!r}{hint}; valid types: {', '.join(sorted(quant_types()))}"


def parse_quant(name: str) -> str:
    """Canonical upper-case type name; an unknown name is a ConfigError listing the valid ones."""
    qt = get(name)
    if qt is None:
        raise ConfigError(unknown_message(name))
    return qt.name


def check_quant(name: str) -> str:
    """For pydantic field validators: the canonical name, or a ValueError naming the valid types."""
    qt = get(name)
    if qt is None:
        raise ValueError(unknown_message(name))
    return qt.name


def check_quants(values: Iterable[str] | None) -> list[str] | None:
    """check_quant over a list setting (None stays None); duplicates dropped, order kept."""
    if values is None:
        return None
    out: list[str] = []
    for v in values:
        q = check_quant(v)
        if q not in out:
            out.append(q)
    return out


def recommended() -> list[str]:
    """The types made by default and recommended in the card, best pick first."""
    return [q.name for q in quant_types().values() if q.recommended]


def default_quant() -> str:
    """The one type a single-file consumer (serve, Space, LM Studio load, Ollama) uses by default."""
    return recommended()[0]


def is_float(name: str) -> bool:
    """True for the unquantized float types (F32, F16, BF16: what the converter writes)."""
    qt = get(name)
    return bool(qt and qt.is_float)


def base_type(name: str) -> str | None:
    """The ggml tensor type the file type is built on: Q4_K_M -> Q4_K, Q8_0 -> Q8_0, IQ3_M -> IQ3_S."""
    qt = get(name)
    return qt.base_type if qt else None


def bits_per_weight(name: str) -> float | None:
    """Nominal bits per weight of the type's base tensor type (None: unknown)."""
    qt = get(name)
    return qt.bits_per_weight if qt else None


def cpu_cost(name: str) -> float:
    """CPU work relative to Q8_0; a type not measured costs what a K-quant mixture does."""
    qt = get(name)
    if qt is not None and qt.cpu_cost is not None:
        return qt.cpu_cost
    fallback = quant_types().get(FALLBACK_COST_TYPE)
    return fallback.cpu_cost if fallback and fallback.cpu_cost is not None else 6.0


def display_key(name: str) -> tuple[int, str]:
    """Sort key for the model card: by rank; names the table does not know last, by name."""
    qt = get(name)
    return (qt.rank if qt else len(quant_types()), str(name))


def precision_key(name: str) -> tuple[float, int, str]:
    """Sort key from the most precise type to the least (bits per weight, then rank); unknown names last."""
    qt = get(name)
    if qt is None:
        return (float("inf"), 0, str(name))
    return (-(qt.bits_per_weight or 0.0), qt.rank, qt.name)


# --- writing the table (the cost measurement's output) ------------------------------------------------


def dump_table(doc: dict[str, Any]) -> str:
    """The JSON text with one type per line, so that a row is one line in a diff."""
    head = {k: v for k, v in doc.items() if k != "types"}
    text = json.dumps(head, indent=1)[:-2] + ',\n "types": [\n'
    text += ",\n".join("  " + json.dumps(row) for row in doc["types"])
    return text + "\n ]\n}\n"


def save_cpu_costs(costs: Mapping[str, float], measured: dict[str, Any], path: Path = TABLE_FILE) -> Path:
    """Write measured relative costs into the table's `cpu_cost` column (other columns untouched)."""
    doc = _read(path)
    rows = {row["name"]: row for row in doc["types"]}
    unknown = sorted(set(costs) - set(rows))
    if unknown:
        raise ConfigError(f"measured types {unknown} are not in {path.name}: add their rows first")
    for name, cost in costs.items():
        rows[name]["cpu_cost"] = cost
    doc["cpu_cost_measured"] = measured
    atomic_write_text(path, dump_table(doc))
    quant_types.cache_clear()
    return path


def as_rows() -> list[dict[str, Any]]:
    return [asdict(q) for q in quant_types().values()]
