"""pipeline.cleanup's one rule (flows/cleanup.py), as the convert/quantize runners and the end of the run use it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows.cleanup import removable, remove_intermediates
from flows.config import parse_config
from tasks.core.artifacts import Artifact


def _config(**cleanup):
    pipeline = {
        "stages": ["download", "merge", "convert", "quantize"],
        "cleanup": cleanup,
    }  # no evaluate: no F16 needed
    return parse_config({"model": {"name": "m"}, "source": {"path": "/p"}, "pipeline": pipeline})


def _gguf(tmp_path: Path, quant: str) -> Artifact:
    path = tmp_path / f"m-{quant}.gguf"
    path.write_bytes(quant.encode() * 8)
    return Artifact.from_path(path, name=f"gguf:{quant}", kind="gguf", stage="quantize", meta={"quant": quant})


def test_an_intermediate_stays_while_a_product_is_missing_or_changed(tmp_path):
    cfg = _config(delete_f16=True, delete_merged=True)
    f16, q4, q8 = _gguf(tmp_path, "F16"), _gguf(tmp_path, "Q4_K_M"), _gguf(tmp_path, "Q8_0")
    assert removable(cfg, [f16]) == []  # nothing was made from it yet
    q8.local_path.write_bytes(b"changed after it was recorded")
    assert removable(cfg, [f16, q4, q8]) == []  # every product must be intact
    q8.local_path.unlink()
    assert removable(cfg, [f16, q4, q8]) == []
    q8 = _gguf(tmp_path, "Q8_0")
    assert [(a.name, s) for a, s in remove_intermediates(cfg, [f16, q4, q8])] == [("gguf:F16", "delete_f16")]
    assert not f16.local_path.exists() and q4.local_path.exists() and q8.local_path.exists()
    assert remove_intermediates(cfg, [f16, q4, q8]) == []  # already gone: nothing to report


def test_only_the_settings_asked_for(tmp_path):
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "model.safetensors").write_bytes(b"w" * 16)
    arts = [Artifact.from_path(merged, name="merged", kind="merged", stage="merge"), _gguf(tmp_path, "F16")]
    arts.append(_gguf(tmp_path, "Q4_K_M"))
    assert removable(_config(), arts) == []
    assert [(a.name, s) for a, s in removable(_config(delete_merged=True), arts)] == [("merged", "delete_merged")]
    assert [a.name for a, _ in remove_intermediates(_config(delete_merged=True, delete_f16=True), arts)] == [
        "merged",
        "gguf:F16",
    ]
    assert not merged.exists() and arts[2].local_path.exists()


@pytest.mark.slow
def test_flow_frees_merged_and_the_f16_as_soon_as_their_products_exist(
    prefect_api, llama_base, llama_adapter, tmp_path
):
    """Through the flow: convert drops merged/ once the F16 is written, quantize the F16 once its quantizations
    are; the stage messages say so and the manifest keeps both records as removed on purpose."""
    from flows.full import full
    from tasks.core.run import RunFolder

    cfg = {
        "model": {"name": "tiny", "version": "c1"},
        "source": {"kind": "local", "path": str(tmp_path / "unused")},
        "quantization": {"types": ["Q8_0"], "generate_tokens": 1},
        "pipeline": {
            "runs_dir": str(tmp_path / "runs"),
            "stages": ["convert", "quantize"],
            "cleanup": {"delete_merged": True, "delete_f16": True},
        },
    }
    run = RunFolder(tmp_path / "runs" / "tiny" / "c1", "tiny", "c1").ensure()
    shutil.copytree(llama_base, run.merged_dir)
    run.record(
        "download", "done", [Artifact.from_path(llama_adapter, name="adapter", kind="adapter", stage="download")]
    )
    run.record("merge", "done", [Artifact.from_path(run.merged_dir, name="merged", kind="merged", stage="merge")])
    summary = full(config=cfg)
    by_stage = {s.stage: s for s in summary.stages}
    assert by_stage["quantize"].status == "done", by_stage
    assert "merged/ deleted (pipeline.cleanup.delete_merged)" in by_stage["convert"].message
    assert "tiny-F16.gguf deleted (pipeline.cleanup.delete_f16)" in by_stage["quantize"].message
    assert not run.merged_dir.exists() and not (run.gguf_dir / "tiny-F16.gguf").exists()
    assert (run.gguf_dir / "tiny-Q8_0.gguf").is_file()
    manifest = run.load_manifest()
    assert {"merged", "gguf:F16"} <= set(manifest.removed) and "gguf:Q8_0" in manifest.artifacts
