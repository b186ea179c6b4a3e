"""The importance matrix from calibration text: llama.cpp's own llama-imatrix on the tiny real F16, used by
every quant type, recorded in the GGUF metadata like llama-quantize records it, cached by F16 + text + tool.

Needs llama.cpp's tools (./setup.sh --llama-tools; built on first use otherwise, about 5 minutes).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest

from tasks.core.artifacts import Artifact
from tasks.core.errors import PermanentError
from tasks.gguf.imatrix import compute_imatrix, window_for
from tasks.gguf.quantize import QuantizeSettings, quantize, quantize_all
from tasks.gguf.validate import _field_value
from tasks.support.tiny_models import corpus_lines

pytestmark = pytest.mark.slow


def _f16(path: Path) -> Artifact:
    return Artifact.from_path(path, name="gguf:F16", kind="gguf", stage="convert", meta={"quant": "F16"})


def _kv(path: Path) -> dict[str, object]:
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    keys = [k for k in reader.fields if k.startswith("quantize.imatrix.")]
    return {k: _field_value(reader, k) for k in keys}


def _tensor_bytes(path: Path, name: str) -> bytes:
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    return bytes(next(t for t in reader.tensors if t.name == name).data.tobytes())


def test_imatrix_is_computed_once_used_by_every_type_recorded_and_cached(llama_ggufs, tmp_path):
    f16 = _f16(llama_ggufs["F16"])
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(corpus_lines()))
    out = tmp_path / "gguf"
    settings = QuantizeSettings(
        types=["Q4_K_M", "IQ4_XS"], compute_imatrix=True, calibration=str(calib), generate_tokens=1
    )
    made = quantize_all(f16, settings, out, "im")

    files = {a.meta["imatrix_info"]["file"] for a in made}
    assert len(files) == 1  # one matrix for every type
    name = files.pop()
    matrix = out / "imatrix" / name
    assert matrix.is_file() and matrix.with_suffix(".json").is_file()
    for a in made:
        assert a.meta["imatrix"] is True
        kv = _kv(Path(a.path))
        assert kv["quantize.imatrix.file"] == name  # a name, never a local path
        assert kv["quantize.imatrix.dataset"] == "calib.txt"
        assert kv["quantize.imatrix.entries_count"] == a.meta["imatrix_info"]["entries"] > 0
        assert kv["quantize.imatrix.chunks_count"] >= 1
    assert "IQ4_XS" in made[1].meta["tensor_types"] and "Q4_K" in made[0].meta["tensor_types"]

    # used: the same type without it rounds differently
    plain = quantize(f16, "Q4_K_M", QuantizeSettings(generate_tokens=0), tmp_path / "plain", "im", threads=2)
    assert _kv(Path(plain.path)) == {} and plain.meta["imatrix"] is False
    tensor = "blk.0.ffn_down.weight"
    assert _tensor_bytes(Path(plain.path), tensor) != _tensor_bytes(Path(made[0].path), tensor)

    # re-run: the cache answers (same file, not recomputed); a changed text computes a new one
    mtime = matrix.stat().st_mtime_ns
    again = compute_imatrix(f16, calib, out)
    assert again.computed is False and again.path == matrix and matrix.stat().st_mtime_ns == mtime
    calib.write_text("\n".join(reversed(corpus_lines())))
    changed = compute_imatrix(f16, calib, out)
    assert changed.computed is True and changed.path != matrix and changed.sha256 != again.sha256


def test_a_given_imatrix_file_still_wins_and_short_texts_are_refused(llama_ggufs, tmp_path, caplog):
    f16 = _f16(llama_ggufs["F16"])
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(corpus_lines()))
    with caplog.at_level(logging.INFO, logger="loraship.quantize"):
        matrix = compute_imatrix(f16, calib, tmp_path / "gguf")
    # the tool's own plan, read from its output, is what the user sees while it runs
    assert re.search(r"imatrix: \d+ chunk\(s\) of .*F16.* at about [\d.]+ s each", caplog.text), caplog.text
    given = quantize(
        f16,
        "Q4_K_M",
        QuantizeSettings(imatrix=str(matrix.path), compute_imatrix=True, calibration="/nonexistent", generate_tokens=0),
        tmp_path / "given",
        "im",
        threads=2,
    )
    assert _kv(Path(given.path))["quantize.imatrix.file"] == matrix.path.name
    assert given.meta["imatrix_info"]["sha256"] == matrix.sha256
    with pytest.raises(PermanentError, match="at least 32"):
        window_for(20)
    short = tmp_path / "short.txt"
    short.write_text("Hello world.")
    with pytest.raises(PermanentError, match="quantization.calibration"):
        compute_imatrix(f16, short, tmp_path / "gguf")


def test_the_flow_computes_one_imatrix_from_the_evaluation_text_and_caches_the_run(prefect_api, llama_base, tmp_path):
    """Through Prefect: calibration defaults to evaluation.heldout_text; the second run is all cache hits."""
    import shutil

    from flows.full import full
    from tasks.core.run import RunFolder

    text = tmp_path / "heldout.txt"
    text.write_text("\n".join(corpus_lines()))
    cfg = {
        "model": {"name": "tiny", "version": "t1"},
        "source": {"kind": "local", "path": str(tmp_path / "unused")},
        "quantization": {"types": ["Q4_K_M", "IQ4_XS"], "generate_tokens": 1, "compute_imatrix": True},
        "evaluation": {"heldout_text": str(text)},
        "pipeline": {"runs_dir": str(tmp_path / "runs"), "stages": ["convert", "quantize"]},
    }
    run = RunFolder(tmp_path / "runs" / "tiny" / "t1", "tiny", "t1").ensure()
    shutil.copytree(llama_base, run.merged_dir)
    run.record("merge", "done", [Artifact.from_path(run.merged_dir, name="merged", kind="merged", stage="merge")])
    first = full(config=cfg)
    assert {s.stage: s.status for s in first.stages} == {"convert": "done", "quantize": "done"}, first.stages
    manifest = run.load_manifest()
    infos = [manifest.artifacts[f"gguf:{q}"].meta["imatrix_info"] for q in ("Q4_K_M", "IQ4_XS")]
    assert infos[0]["sha256"] == infos[1]["sha256"] and infos[0]["dataset"] == "heldout.txt"
    assert len(list((run.gguf_dir / "imatrix").glob("imatrix-*.gguf"))) == 1
    second = full(config=cfg)
    assert {s.stage: s.status for s in second.stages} == {"convert": "cached", "quantize": "cached"}


def test_the_imatrix_progress_is_estimated_from_the_tools_plan_and_never_finishes_early():
    """llama-imatrix --no-ppl prints its plan (lines as the vendored tool prints them) and then nothing until it
    ends: the bar advances by time per pass, stops one chunk short, and completes only when the tool has."""
    from tasks.gguf.imatrix import _EstimatedProgress

    est = _EstimatedProgress("m-F16.gguf")
    est.line("0.00.049.368 I compute_imatrix: computing over 18 chunks, n_ctx=64, batch_size=64, n_seq=1")
    est.line("0.00.070.861 I compute_imatrix: 0.01 seconds per pass - ETA 0.00 minutes")
    assert est.chunks == 18 and est.per_pass == 0.01 and est._progress is not None
    for _ in range(200):  # the ticker runs once a second
        if est._progress.done >= 17:
            break
        time.sleep(0.05)
    assert est._progress.done == 17  # not 18: the tool has not said it is done
    est.close(ok=True)
    assert est._progress.done == 18
    silent = _EstimatedProgress("x")
    silent.line("some other line")
    silent.close(ok=False)  # no plan seen: nothing to draw, nothing raised
    assert silent._progress is None
