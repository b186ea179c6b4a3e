"""The JSON readers (tasks/core/jsonfiles.py): required inputs fail naming the file, optional ones fall back."""

from __future__ import annotations

import pytest

from tasks.core.errors import PermanentError
from tasks.core.jsonfiles import read_json, read_json_dict, read_json_or


def test_a_required_file_that_is_missing_or_damaged_names_itself(tmp_path):
    good = tmp_path / "config.json"
    good.write_text('{"a": 1}')
    assert read_json(good) == {"a": 1}
    with pytest.raises(PermanentError, match="adapter_config.json is missing") as err:
        read_json(tmp_path / "adapter_config.json")
    assert "adapter_config.json" in err.value.hint
    bad = tmp_path / "index.json"
    bad.write_text('{"weight_map": ')
    with pytest.raises(PermanentError, match="index.json is not valid JSON"):
        read_json(bad)
    bad.write_bytes(b"\xff\xfe{}")
    with pytest.raises(PermanentError, match="not valid JSON"):
        read_json(bad)


def test_an_optional_file_falls_back(tmp_path):
    assert read_json_or(None) is None and read_json_or("", {}) == {}
    assert read_json_or(tmp_path / "nope.json", "default") == "default"
    assert read_json_or(tmp_path, "dir") == "dir"  # a folder is not a file
    damaged = tmp_path / "trainer_state.json"
    damaged.write_text("{not json")
    assert read_json_or(damaged) is None
    big = tmp_path / "results.json"
    big.write_text('{"loss": 1.0}')
    assert read_json_or(big) == {"loss": 1.0} and read_json_or(big, "too big", max_bytes=5) == "too big"
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    assert read_json_or(listed) == [1, 2] and read_json_dict(listed) == {} and read_json_dict(big) == {"loss": 1.0}
