"""The prepared GPU check (`python -m benchmarks.gpu_bench --all`, issue 19), on this CPU machine.

Without a GPU it must stop at once naming everything it lacks; with --allow-cpu it runs its CPU-safe parts
on a tiny model (real merge, convert, three quants, llama.cpp generation) and records the GPU steps as
skipped with the reason, in the one JSON a GPU run writes. The ulp comparison it uses for unsloth against
streaming is checked on real merges.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _check(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "benchmarks.gpu_bench", "--all", "--size", "tiny", "--no-build"]
    cmd += ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "check.json"), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_on_a_cpu_machine_it_stops_at_once_naming_what_is_missing(tmp_path: Path) -> None:
    out = _check(tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    for missing in ("a CUDA GPU", "the unsloth package", "llama-cpp-python built with CUDA", "--allow-cpu"):
        assert missing in out.stderr, out.stderr
    assert not (tmp_path / "check.json").exists() and not (tmp_path / "work").exists()  # nothing was run


@pytest.mark.slow
def test_its_cpu_safe_parts_run_here_and_the_gpu_steps_say_why_not(tmp_path: Path) -> None:
    out = _check(tmp_path, "--allow-cpu")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "check.json").read_text())
    steps = {s["step"]: s for s in result["steps"]}
    assert steps["build (setup.sh)"]["reason"] == "--no-build"
    for gpu_step in ("unsloth merge test (tiny bf16 fixture)", "tiny merge: unsloth", "model API fp16 path"):
        assert steps[gpu_step]["status"] == "skipped" and "a CUDA GPU" in steps[gpu_step]["reason"], gpu_step
    gpu_tps = steps["tiny generation tokens/s, GPU (all layers)"]
    assert gpu_tps["status"] == "skipped" and "llama-cpp-python built with CUDA" in gpu_tps["reason"]
    quantize = "tiny quantize Q4_K_M+Q5_K_M+Q8_0 (plan, all cores)"
    for cpu_step in ("tiny merge: streaming", "tiny convert (F16)", quantize):
        assert steps[cpu_step]["status"] == "ok", steps[cpu_step]
    quant = steps[quantize]
    assert quant["cpu_s"] > 0 and quant["wall_vs_cpu_floor"] == pytest.approx(
        quant["wall_s"] / quant["cpu_floor_s"], rel=0.1
    )
    cpu_tps = steps[f"tiny generation tokens/s, CPU ({os.cpu_count()} threads)"]
    assert cpu_tps["status"] == "ok" and cpu_tps["tokens"] > 0 and cpu_tps["tokens_per_s"] > 0
    r = result["results"]
    assert r["merge_convert_quantize_s"] > 0 and r["cpu_tokens_per_s"] > 0 and "gpu_tokens_per_s" not in r
    assert set(result["missing"]) >= {"cuda", "unsloth", "llama_gpu"} and result["goals"]["pipeline_7b_s"] == 300


def test_ulps_between_two_merges(tmp_path: Path) -> None:
    """The streaming merge and peft agree within one bf16 ulp per weight (tasks/merge/backends/streaming.py):
    the comparison the GPU check applies to unsloth says so, and counts a nudged weight."""
    import torch
    from safetensors.torch import load_file, save_file

    from benchmarks.gpu_check import max_ulps
    from tasks.core.artifacts import Artifact
    from tasks.merge.stage import MergeSettings, merge
    from tasks.support.tiny_models import tiny_adapter, tiny_model

    base = tiny_model("llama", dtype="bfloat16")
    adapter = Artifact.from_path(tiny_adapter(base), name="adapter", kind="adapter", stage="download")
    merged = {
        b: Path(merge(adapter, MergeSettings(backend=b, base_model=str(base), verify="never"), tmp_path / b).path)
        for b in ("streaming", "peft")
    }
    same = max_ulps(merged["streaming"], merged["streaming"])
    assert same["max_ulps"] == 0 and same["weights_over_1_ulp"] == 0 and same["tensors"] > 10
    assert max_ulps(merged["streaming"], merged["peft"], base)["max_ulps"] <= 1

    (shard,) = list(merged["streaming"].glob("*.safetensors"))
    tensors = load_file(shard)
    name = "model.layers.0.mlp.down_proj.weight"
    w = tensors[name].clone()
    bits = w.view(torch.int16)
    bits[0, :3] += 3  # three weights, three representable bf16 steps each (same sign, finite)
    tensors[name] = bits.view(torch.bfloat16)
    nudged = tmp_path / "nudged"
    nudged.mkdir()
    save_file(tensors, str(nudged / shard.name))
    d = max_ulps(merged["streaming"], nudged)
    assert (d["worst_tensor"], d["weights_over_1_ulp"]) == (name, 3) and 1.5 <= d["max_ulps"] <= 3
