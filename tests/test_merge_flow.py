"""The merge stage inside the real flow (a real Prefect test API): manifest record, cache hit, recompute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


def _config(adapter: Path, base: Path, runs: Path, **merge) -> dict:
    return {
        "model": {"name": "mergetest", "version": "v1", "base_model": str(base)},
        "source": {"kind": "local", "path": str(adapter)},
        "merge": {"base_model": str(base), **merge},
        "pipeline": {"runs_dir": str(runs)},
    }


def test_merge_in_flow_records_manifest_and_rerun_is_cache_hit(prefect_api, llama_base, llama_adapter, tmp_path):
    from flows.full import full

    cfg = _config(llama_adapter, llama_base, tmp_path / "runs")
    first = full(config=cfg, only=["download", "merge"])
    merge_stage = next(s for s in first.stages if s.stage == "merge")
    assert merge_stage.status == "done" and "max |logit diff|" in merge_stage.message
    manifest = json.loads(Path(first.manifest).read_text())
    merged = manifest["artifacts"]["merged"]
    assert merged["kind"] == "merged" and merged["meta"]["max_abs_logit_diff"] < 1e-3
    assert merged["inputs"]["adapter"] == manifest["artifacts"]["adapter"]["sha256"]
    assert {f["path"] for f in merged["files"]} >= {"model.safetensors", "config.json", "tokenizer.json"}

    second = full(config=cfg, only=["download", "merge"])
    assert next(s for s in second.stages if s.stage == "merge").status == "cached"

    # The merged folder changed behind the cache's back: recomputed, not a dangling hit.
    (Path(merged["path"]) / "model.safetensors").write_bytes(b"broken")
    third = full(config=cfg, only=["download", "merge"])
    assert next(s for s in third.stages if s.stage == "merge").status == "done"
    assert json.loads(Path(third.manifest).read_text())["artifacts"]["merged"]["sha256"] == merged["sha256"]
