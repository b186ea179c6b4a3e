"""Lineage (tasks/core/lineage.py): which recorded artifacts a run may still use, and why the others left."""

from __future__ import annotations

from pathlib import Path

from tasks.core.artifacts import Artifact
from tasks.core.lineage import Lineage


def _art(path: Path, name: str, stage: str, inputs: list[Artifact] | dict[str, str] = (), **meta) -> Artifact:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(name.encode() * 8)
    return Artifact.from_path(path, name=name, kind="gguf", stage=stage, inputs=inputs, meta=meta)


def test_a_record_made_from_the_current_inputs_is_carried(tmp_path: Path) -> None:
    f16 = _art(tmp_path / "F16.gguf", "gguf:F16", "convert", quant="F16")
    q4 = _art(tmp_path / "Q4.gguf", "gguf:Q4_K_M", "quantize", [f16], quant="Q4_K_M")
    lineage = Lineage()
    lineage.adopt([f16])
    kept, dropped = lineage.carry("quantize", {q4.name: q4, f16.name: f16})
    assert [a.name for a in kept] == ["gguf:Q4_K_M"] and dropped == {}
    assert lineage.artifacts["gguf:Q4_K_M"] is q4


def test_a_record_of_an_older_input_leaves_the_lineage(tmp_path: Path) -> None:
    old_f16 = _art(tmp_path / "old" / "F16.gguf", "gguf:F16", "convert")
    q4 = _art(tmp_path / "Q4.gguf", "gguf:Q4_K_M", "quantize", [old_f16])
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "F16.gguf").write_bytes(b"retrained" * 8)
    new_f16 = Artifact.from_path(tmp_path / "new" / "F16.gguf", name="gguf:F16", kind="gguf", stage="convert")
    lineage = Lineage()
    lineage.adopt([new_f16])
    kept, dropped = lineage.carry("quantize", {q4.name: q4})
    assert kept == [] and "made from gguf:F16" in dropped["gguf:Q4_K_M"]
    assert lineage.superseded["gguf:Q4_K_M"] == dropped["gguf:Q4_K_M"]


def test_changed_files_and_unwanted_types_leave_it(tmp_path: Path) -> None:
    f16 = _art(tmp_path / "F16.gguf", "gguf:F16", "convert")
    q4 = _art(tmp_path / "Q4.gguf", "gguf:Q4_K_M", "quantize", [f16], quant="Q4_K_M")
    q8 = _art(tmp_path / "Q8.gguf", "gguf:Q8_0", "quantize", [f16], quant="Q8_0")
    lineage = Lineage()
    lineage.adopt([f16])
    (tmp_path / "Q4.gguf").write_bytes(b"changed on disk, same size?")

    def wanted(a: Artifact, config: dict, _lineage: Lineage) -> str | None:
        return None if a.meta["quant"] in config["types"] else f"no longer lists {a.meta['quant']}"

    kept, dropped = lineage.carry("quantize", {q4.name: q4, q8.name: q8}, {"types": ["Q4_K_M"]}, wanted)
    assert kept == []
    assert "bytes, expected" in dropped["gguf:Q4_K_M"] or "changed" in dropped["gguf:Q4_K_M"]
    assert dropped["gguf:Q8_0"] == "no longer lists Q8_0"


def test_cleaned_up_inputs_and_own_inputs(tmp_path: Path) -> None:
    """An F16 deleted by pipeline.cleanup still counts as the input of its quantizations (the manifest's
    `removed`); a recorded input that is not an artifact (merge's base fingerprint) is the stage's to judge."""
    q4 = _art(tmp_path / "Q4.gguf", "gguf:Q4_K_M", "quantize", {"gguf:F16": "a" * 64})
    merged = _art(tmp_path / "merged.bin", "merged", "merge", {"base": "fingerprint-1"})
    lineage = Lineage(removed={"gguf:F16": "a" * 64})
    assert lineage.carry("quantize", {q4.name: q4})[0] == [q4]
    kept, _ = lineage.carry("merge", {merged.name: merged}, own_inputs=["base"])
    assert kept == [merged]
    kept, dropped = Lineage().carry("merge", {merged.name: merged})
    assert kept == [] and "base" in dropped["merged"]
