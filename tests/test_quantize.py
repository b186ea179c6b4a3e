"""Quantize stage: real llama_model_quantize on the tiny real models, validation, plan, Prefect caching."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from flows.config import parse_config
from tasks.core.artifacts import Artifact
from tasks.core.errors import ConfigError, PermanentError
from tasks.gguf.plan import plan_jobs
from tasks.gguf.quantize import QuantizeSettings, parse_quant, quantize, quantize_all
from tasks.gguf.validate import read_gguf, validate_gguf


def _f16(path: Path, tmp: Path | None = None) -> Artifact:
    if tmp is not None:
        dst = tmp / path.name
        shutil.copy2(path, dst)
        path = dst
    return Artifact.from_path(
        path, name="gguf:F16", kind="gguf", stage="convert", meta={"quant": "F16", "llama_cpp_commit": "test"}
    )


@pytest.mark.parametrize("files", ["llama_ggufs", "qwen2_ggufs"])
def test_fixture_types_have_their_tensor_types(files, request):
    ggufs = request.getfixturevalue(files)
    f16 = read_gguf(ggufs["F16"])
    for quant, want in (("Q4_K_M", "Q4_K"), ("Q5_K_M", "Q5_K"), ("Q8_0", "Q8_0")):
        info = validate_gguf(ggufs[quant], quant=quant, reference=f16)
        assert want in info["tensor_types"], (quant, info["tensor_types"])
        assert info["tensor_count"] == f16["tensor_count"]
        assert info["size"] < f16["size"]
    assert (
        read_gguf(ggufs["Q4_K_M"])["bits_per_weight"]
        < read_gguf(ggufs["Q5_K_M"])["bits_per_weight"]
        < read_gguf(ggufs["Q8_0"])["bits_per_weight"]
    )


def test_unknown_type_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="Q4_K_Z.*did you mean 'Q4_K_[SM]'.*valid types: .*Q8_0"):
        parse_quant("Q4_K_Z")
    # in the config file: the field path and the valid names, at load time
    with pytest.raises(ConfigError, match=r"quantization.types.*unknown quantization type 'q9_k'.*valid types"):
        parse_config(
            {
                "model": {"name": "m"},
                "source": {"kind": "local", "path": str(tmp_path)},
                "quantization": {"types": ["Q4_K_M", "q9_k"]},
            }
        )
    # the plain function refuses before touching its input (which does not even exist here)
    ghost = Artifact(
        name="gguf:F16", kind="gguf", path=str(tmp_path / "none.gguf"), sha256="0", size=0, stage="convert"
    )
    with pytest.raises(ConfigError):
        quantize(ghost, "Q4_Z", QuantizeSettings(), tmp_path, "m")
    assert not list(tmp_path.iterdir())


def test_type_names_are_case_insensitive_and_deduplicated():
    s = QuantizeSettings(types=["q4_k_m", "Q4_K_M", "q8_0"], output_tensor_type="q8_0")
    assert s.types == ["Q4_K_M", "Q8_0"] and s.output_tensor_type == "Q8_0"
    with pytest.raises(Exception, match="unknown tensor type"):
        QuantizeSettings(token_embedding_type="Q4_K_M")


def test_options_reach_llama_cpp(llama_ggufs, tmp_path):
    f16 = _f16(llama_ggufs["F16"])
    s = QuantizeSettings(types=["Q4_K_M"], output_tensor_type="Q8_0", token_embedding_type="Q5_0", generate_tokens=0)
    a = quantize(f16, "Q4_K_M", s, tmp_path, "opt", threads=2)
    types = read_gguf(a.path)["tensor_type_of"]
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q5_0"
    pure = quantize(f16, "q4_k_m", QuantizeSettings(pure=True, generate_tokens=0), tmp_path, "pure", threads=2)
    assert set(pure.meta["tensor_types"]) == {"Q4_K", "F32"}
    leave = quantize(
        f16, "Q8_0", QuantizeSettings(leave_output_tensor=True, generate_tokens=0), tmp_path, "leave", threads=2
    )
    assert read_gguf(leave.path)["tensor_type_of"]["output.weight"] == "F16"


@pytest.mark.slow
def test_k_quant_fallback_is_caught(tmp_path):
    """hidden_size 64: rows are not a multiple of 256, llama.cpp silently writes no Q4_K: validation refuses."""
    from tasks.gguf.convert import ConvertSettings, convert
    from tasks.support.tiny_models import tiny_model

    small = tiny_model("llama", hidden=64, intermediate=128)
    f16 = convert(
        Artifact.from_path(small, name="merged", kind="merged", stage="merge"),
        ConvertSettings(check_tokenizer=False),
        tmp_path,
        "small",
    )
    with pytest.raises(PermanentError, match="asked for Q4_K_M but no tensor has type Q4_K"):
        quantize(f16, "Q4_K_M", QuantizeSettings(generate_tokens=0), tmp_path, "small", threads=2)
    assert not (tmp_path / "small-Q4_K_M.gguf").exists()  # an invalid file never stays under its final name


def test_plan_splits_cores_and_bounds_memory():
    big = (32_000 * 1024, 2 * 32_000 * 1024)  # a 0.4B model's embedding, F16
    types = ["Q8_0", "Q4_K_M", "Q5_K_M"]
    many = plan_jobs(None, types, cores=16, memory=64 * 2**30, largest=big)
    assert many.parallel == 3 and many.order[-1] == "Q8_0"  # costliest first, the cheap Q8_0 last
    # threads follow each type's CPU work (Q4_K_M costs several times Q8_0), at most one per core each
    assert (
        many.threads_for("Q4_K_M") > 2 * many.threads_for("Q8_0") and many.threads == many.threads_for("Q4_K_M") <= 16
    )
    assert (
        sum(many.threads_by_type.values()) <= 2 * 16 + 2 and many.threads_for("Q4_K_M") == 16
    )  # the last one running may use every core
    assert many.est_peak_bytes <= 1.5 * many.est_single_bytes  # the memory goal: slabs are capped
    assert 0 < many.max_buf_size < 8 * 2**30
    two = plan_jobs(None, types, cores=2, memory=64 * 2**30, largest=big)
    assert two.parallel == 3 and two.est_peak_bytes <= 1.5 * two.est_single_bytes
    assert all(1 <= two.threads_for(q) <= 2 for q in types)
    one = plan_jobs(None, types, cores=1, memory=64 * 2**30, largest=big)
    assert (one.parallel, one.threads, one.max_buf_size) == (1, 1, 0)  # one core: nothing to overlap
    tight = plan_jobs(None, types, cores=16, memory=300 * 2**20, largest=big)
    assert (
        tight.parallel == 1 and 0 < tight.max_buf_size < many.max_buf_size
    )  # little memory: one at a time, small slabs
    assert tight.threads_for("Q8_0") == 16  # alone on the machine: every core
    roomy = plan_jobs(None, ["Q4_K_M"], cores=16, memory=64 * 2**30, largest=big)
    assert roomy.parallel == 1 and roomy.max_buf_size == 0 and roomy.threads == 16  # one job alone: whole tensors
    forced = plan_jobs(None, types, cores=4, memory=64 * 2**30, largest=big, parallel=1, threads=3)
    assert (forced.parallel, forced.threads) == (1, 3) and set(forced.threads_by_type.values()) == {3}
    unknown = plan_jobs(None, 2, cores=4, memory=64 * 2**30, largest=big)  # a count: equal jobs, equal threads
    assert unknown.threads_by_type == {"job0": 4, "job1": 4}


def test_ordered_slots_start_the_costliest_first():
    """The gate lets waiting jobs start by rank, at most `size` at once, whatever order threads arrive in."""
    import threading
    import time

    from tasks.gguf.quantize import OrderedSlots

    gate = OrderedSlots(1)
    gate.acquire(99)  # hold the only slot while the others queue up in a shuffled order
    started: list[int] = []
    running = [0]
    peak = [0]
    lock = threading.Lock()

    def job(rank: int) -> None:
        gate.acquire(rank)
        with lock:
            started.append(rank)
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        gate.release()

    threads = [threading.Thread(target=job, args=(r,)) for r in (2, 0, 3, 1)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while len(gate.waiting) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.release()
    for t in threads:
        t.join(5)
    assert started == [0, 1, 2, 3] and peak[0] == 1


def test_quantize_all_in_threads_with_progress_bounded_memory(llama_ggufs, tmp_path):
    f16 = _f16(llama_ggufs["F16"])
    s = QuantizeSettings(types=["Q4_K_M", "Q8_0"], generate_tokens=2)
    plan = plan_jobs(Path(f16.path), s.types, cores=2, memory=2**34)
    arts = quantize_all(f16, s, tmp_path, "par", plan=plan)
    assert [a.name for a in arts] == ["gguf:Q4_K_M", "gguf:Q8_0"]
    for a in arts:
        assert a.kind == "gguf" and Path(a.path).name == f"par-{a.meta['quant']}.gguf"
        assert a.inputs == {"gguf:F16": f16.sha256} and a.meta["llama_cpp_commit"] == "test"
        assert a.meta["bits_per_weight"] > 4 and len(a.meta["generation"]["tokens"]) == 2
        assert a.is_intact(full=True)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".partial-")]


@pytest.mark.slow
def test_flow_convert_and_quantize_then_cache_hit(prefect_api, llama_base, llama_adapter, tmp_path):
    """Through Prefect: mapped quantize tasks, artifacts in the manifest, and a second run is all cache hits."""
    from flows.full import full

    cfg = {
        "model": {"name": "tiny", "version": "t1"},
        "source": {"kind": "local", "path": str(tmp_path / "unused")},
        "convert": {"lora_adapter": True},
        "quantization": {"types": ["Q4_K_M", "Q8_0"], "generate_tokens": 1},
        "pipeline": {"runs_dir": str(tmp_path / "runs"), "stages": ["convert", "quantize"]},
    }
    run_dir = tmp_path / "runs" / "tiny" / "t1"
    # a merged artifact from an earlier stage, as the flow finds it in the run folder's manifest
    from tasks.core.run import RunFolder

    run = RunFolder(run_dir, "tiny", "t1").ensure()
    merged_dir = run.merged_dir
    shutil.copytree(llama_base, merged_dir)
    run.record(
        "download", "done", [Artifact.from_path(llama_adapter, name="adapter", kind="adapter", stage="download")]
    )
    run.record("merge", "done", [Artifact.from_path(merged_dir, name="merged", kind="merged", stage="merge")])
    first = full(config=cfg)
    by_stage = {s.stage: s for s in first.stages}
    assert by_stage["convert"].status == "done" and by_stage["quantize"].status == "done", by_stage
    assert set(by_stage["quantize"].artifacts) == {"gguf:Q4_K_M", "gguf:Q8_0"}  # not the LoRA: it has its own kind
    assert set(by_stage["convert"].artifacts) == {"gguf:F16", "gguf-lora:F16"}
    manifest = run.load_manifest()
    assert manifest.artifacts["gguf:F16"].meta["llama_cpp_commit"]
    assert manifest.artifacts["gguf:Q4_K_M"].meta["tensor_types"].get("Q4_K")
    assert (run.gguf_dir / "tiny-Q4_K_M.gguf").is_file()
    second = full(config=cfg)
    assert {s.stage: s.status for s in second.stages} == {"convert": "cached", "quantize": "cached"}


def _write_imatrix(f16: Path, out: Path) -> Path:
    """An imatrix GGUF in llama-imatrix's layout for every matrix: <tensor>.in_sum2 [n_per_row], <tensor>.counts [1]."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(f16), "r")
    w = gguf.GGUFWriter(str(out), "imatrix")
    rng = np.random.default_rng(0)
    for t in reader.tensors:
        if len(t.shape) >= 2 and t.name != "token_embd.weight":
            n_per_row = int(t.shape[0])
            w.add_tensor(f"{t.name}.in_sum2", (rng.random(n_per_row, dtype=np.float32) + 0.5) * 10)
            w.add_tensor(f"{t.name}.counts", np.array([10.0], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_imatrix_file_enables_low_bit_iq_types(llama_ggufs, tmp_path):
    f16 = _f16(llama_ggufs["F16"])
    imatrix = _write_imatrix(Path(f16.path), tmp_path / "imatrix.gguf")
    a = quantize(f16, "IQ2_XXS", QuantizeSettings(imatrix=str(imatrix), generate_tokens=1), tmp_path, "im", threads=2)
    assert "IQ2_XXS" in a.meta["tensor_types"] and a.meta["imatrix"] is True
    with pytest.raises(PermanentError, match="quantization.imatrix"):
        quantize(f16, "IQ2_XXS", QuantizeSettings(imatrix=str(tmp_path / "missing.gguf")), tmp_path, "im2", threads=2)
