"""The one disk preflight (tasks/core/disk.py) that merge, convert, quantize and evaluate call before writing."""

from __future__ import annotations

import pytest

from tasks.core.disk import MIN_MARGIN, disk_preflight
from tasks.core.errors import PermanentError


def test_the_margin_is_a_tenth_and_at_least_the_minimum(tmp_path):
    disk_preflight(tmp_path, 10**6, "small", free=10**6 + MIN_MARGIN)
    with pytest.raises(PermanentError, match="small"):
        disk_preflight(tmp_path, 10**6, "small", free=10**6 + MIN_MARGIN - 1)
    big = 10 * 10**9
    disk_preflight(tmp_path, big, "big", free=big + big // 10)
    with pytest.raises(PermanentError):
        disk_preflight(tmp_path, big, "big", free=big + big // 10 - 1)


def test_the_error_names_folder_output_numbers_and_what_to_change(tmp_path):
    folder = tmp_path / "made" / "here"
    with pytest.raises(PermanentError) as err:
        disk_preflight(folder, 5 * 10**9, "m-Q8_0.gguf", free=10**9, hint="lower x.y")
    assert folder.is_dir()  # created: the check measures the disk the output lands on
    text = str(err.value)
    assert f"in {folder} for m-Q8_0.gguf" in text and "5.00 GB needed" in text and "1.00 GB free" in text
    assert err.value.hint == "lower x.y"
