"""The local-folder source (the demo's): verified copy, no re-copy when unchanged, exact mirror, metadata."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tasks.core.errors import PermanentError
from tasks.download.stage import DownloadSettings, download, training_summary


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_local_copy_is_verified_mirrored_and_not_repeated(tmp_path):
    src = tmp_path / "out"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (src / "adapter_model.safetensors").write_bytes(b"w" * 5000)
    (src / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": [{"loss": 0.5}]}))
    (src / "optimizer.pt").write_bytes(b"o" * 10)
    dest = tmp_path / "run" / "adapter"
    art = download(DownloadSettings(path=str(src)), dest)
    assert {f.path for f in art.files} == {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json"}
    assert all(f.sha256 == sha(src / f.path) for f in art.files)
    assert art.meta["training"] == {
        "adapter": {"peft_type": "LORA", "r": 4, "lora_alpha": 8},
        "trainer_state": {"global_step": 3, "final_train_loss": 0.5},
    }
    assert art.meta["files_fetched"] == 3

    (dest / "stray.bin").write_bytes(b"x")  # not in the source: removed
    again = download(DownloadSettings(path=str(src)), dest)
    assert again.meta["method"] == "none" and again.meta["bytes_copied"] == 0 and not (dest / "stray.bin").exists()
    assert json.loads((dest.parent / "download.json").read_text())["removed"] == ["stray.bin"]

    with pytest.raises(PermanentError, match="no adapter_config.json"):
        (src / "adapter_config.json").unlink()
        download(DownloadSettings(path=str(src)), dest)


def test_training_summary_ignores_unreadable_files(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{not json")
    assert training_summary(tmp_path, {"all_results.json": {"train_loss": 1.0, "nested": {"x": 1}}}) == {
        "results": {"train_loss": 1.0}
    }
