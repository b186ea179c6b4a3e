"""Conformance of the quant-type table (tasks/data/quant_types.json, read by tasks/gguf/quant_types.py).

The table must cover what the installed llama.cpp can make (a runtime upgrade that adds a file type fails
here until the row is added), agree with the runtime's and gguf-py's numbers, and every setting that names
a quant type must validate against it.
"""

from __future__ import annotations

import json

import pytest

from flows.config import parse_config
from tasks.core.errors import ConfigError
from tasks.gguf import quant_types
from tasks.gguf.quantize import ftype_names, tensor_type_names

ROWS = list(quant_types.quant_types().values())
MINIMAL = {"model": {"name": "m"}, "source": {"kind": "local", "path": "/tmp/adapter"}}
# Every setting that names quant types: (section, key, a valid value, an invalid value).
QUANT_SETTINGS = [
    ("quantization", "types", ["q4_k_m"], ["Q4_K_Z"]),
    ("serving", "quant", "q8_0", "Q9_K"),
    ("serving", "extra_quants", ["Q8_0"], ["Q4_K_MM"]),
    ("space", "quant", "Q5_K_M", "Q5_X"),
    ("deployment", "lms_load_quant", "Q8_0", "Q8"),
    ("deployment", "ollama_quant", "Q4_K_M", "Q4-K-M"),
    ("deployment", "lmstudio_quants", ["Q4_K_M", "Q8_0"], ["Q4_K_M", "Q7_0"]),
    ("evaluation", "quants", ["Q4_K_M"], ["F17"]),
]


def test_table_covers_every_ftype_of_the_installed_llama_cpp():
    runtime = ftype_names()
    missing = sorted(set(runtime) - set(quant_types.names()))
    assert not missing, f"llama.cpp knows {missing}: add a row each to tasks/data/quant_types.json"
    wrong = {q: (quant_types.quant_types()[q].ftype, v) for q, v in runtime.items() if quant_types.get(q).ftype != v}
    assert not wrong, f"ftype values differ from the runtime's (table, runtime): {wrong}"


def test_table_covers_every_file_type_gguf_py_knows():
    """gguf-py's `LlamaFileType` mirrors llama.cpp's enum too (the reader/validator side): same names, same values."""
    import gguf

    known = {
        member.removeprefix("MOSTLY_").removeprefix("ALL_"): int(value)
        for member, value in gguf.LlamaFileType.__members__.items()
        if member != "GUESSED"  # not a file type: the converter's "pick for me"
    }
    missing = sorted(set(known) - set(quant_types.names()))
    assert not missing, f"gguf-py knows {missing}: add a row each to tasks/data/quant_types.json"
    wrong = {q: (quant_types.get(q).ftype, v) for q, v in known.items() if quant_types.get(q).ftype != v}
    assert not wrong, f"ftype values differ from gguf-py's LlamaFileType (table, gguf-py): {wrong}"


@pytest.mark.parametrize("qt", ROWS, ids=lambda q: q.name)
def test_row(qt):
    import gguf

    assert qt.name == qt.name.upper() and qt.name in ftype_names()
    known = set(tensor_type_names()) | set(gguf.GGMLQuantizationType.__members__)  # the bindings lack a few
    assert qt.base_type in known, f"{qt.base_type} is not a ggml tensor type"
    if qt.base_type in gguf.GGMLQuantizationType.__members__:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qt.base_type]]
        assert qt.bits_per_weight == 8.0 * size / block
    else:  # newer than the gguf reader: the row documents that its files cannot be validated yet
        assert qt.bits_per_weight and "gguf" in qt.advice
    assert qt.is_float == (qt.base_type in ("F32", "F16", "BF16"))
    assert (qt.cpu_cost is None) if qt.is_float else (qt.cpu_cost is None or qt.cpu_cost > 0)
    assert not (qt.recommended and qt.is_float)
    assert qt.advice.strip() and "\n" not in qt.advice and len(qt.advice) <= 100


def test_table_shape():
    assert sorted(q.rank for q in ROWS) == list(range(len(ROWS)))
    assert quant_types.get("Q8_0").cpu_cost == 1.0  # the costs are relative to Q8_0
    assert quant_types.recommended() == ["Q4_K_M", "Q5_K_M", "Q8_0"] and quant_types.default_quant() == "Q4_K_M"
    assert {q.name for q in ROWS if q.is_float} == {"F32", "F16", "BF16"}
    assert quant_types.cpu_cost("NVFP4") == quant_types.cpu_cost("Q4_K_M")  # unmeasured: a K-quant's cost
    assert quant_types.base_type("IQ3_M") == "IQ3_S" and quant_types.base_type("Q4_K_M") == "Q4_K"


def test_orders():
    made = ["Q4_K_M", "F16", "Q8_0", "Q5_K_M", "Q6_K"]
    assert sorted(made, key=quant_types.display_key)[:2] == ["Q4_K_M", "Q5_K_M"]
    assert sorted(made, key=quant_types.display_key)[-1] == "F16"  # floats after the quants in the card
    assert sorted(made, key=quant_types.precision_key) == ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"]
    assert sorted(["X9", "Q8_0"], key=quant_types.display_key) == ["Q8_0", "X9"]


def test_parse_quant():
    assert quant_types.parse_quant(" q4_k_m ") == "Q4_K_M"
    with pytest.raises(ConfigError, match="Q4_K_Z.*did you mean 'Q4_K_[SM]'.*valid types: .*Q8_0"):
        quant_types.parse_quant("Q4_K_Z")


@pytest.mark.parametrize("section,key,good,bad", QUANT_SETTINGS, ids=[f"{s}.{k}" for s, k, _, _ in QUANT_SETTINGS])
def test_every_quant_setting_validates_against_the_table(section, key, good, bad):
    cfg = parse_config({**MINIMAL, section: {key: good}})
    value = getattr(getattr(cfg, section), key)
    assert value == ([g.upper() for g in good] if isinstance(good, list) else good.upper())
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, section: {key: bad}})
    assert f"{section}.{key}" in str(err.value) and "valid types: " in str(err.value)


def test_defaults_come_from_the_table():
    cfg = parse_config(MINIMAL)
    assert cfg.quantization.types == quant_types.recommended()
    for value in (cfg.serving.quant, cfg.space.quant, cfg.deployment.lms_load_quant, cfg.deployment.ollama_quant):
        assert value == quant_types.default_quant()


def test_the_file_is_in_its_written_form_and_the_cost_writer_touches_only_costs(tmp_path):
    text = quant_types.TABLE_FILE.read_text()
    assert quant_types.dump_table(json.loads(text)) == text  # --write keeps diffs to the changed rows
    copy = tmp_path / "quant_types.json"
    copy.write_text(text)
    measured = {"command": "test", "q8_0_ns_per_weight": 1.0}
    try:
        quant_types.save_cpu_costs({"Q4_K_M": 3.25}, measured, path=copy)
    finally:
        quant_types.quant_types.cache_clear()
    before, after = json.loads(text), json.loads(copy.read_text())
    assert after["cpu_cost_measured"] == measured
    for old, new in zip(before["types"], after["types"]):
        assert new == ({**old, "cpu_cost": 3.25} if old["name"] == "Q4_K_M" else old)
    with pytest.raises(ConfigError, match="not in"):
        quant_types.save_cpu_costs({"Q9_Z": 1.0}, measured, path=copy)
