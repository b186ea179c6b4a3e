"""merge.fused_convert: llama.cpp's real converter reading the base through the fused tensor source.

The claim under test: the fused GGUF's tensors (names, order, types, shapes, bytes) are exactly those of
converting the streaming-merged folder, on the Llama and Qwen2 fixtures, with tied embeddings, modules_to_save,
DoRA and rsLoRA; merged/ then holds no weights; the merge verification still runs (the logit check in the merge
stage, the per-tensor check in the converter's process, which fails the stage on a wrong tensor).
The shared read (a later stage needs merged/'s weights): one converter run writes merged/ byte-identical to the
streaming merge's (every file, headers and index included) and the GGUF byte-identical to converting it; the
convert stage reuses that GGUF instead of converting again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.core.errors import PermanentError
from tasks.gguf.convert import ConvertSettings, convert
from tasks.merge.fused import RECIPE_FILE, FusedRecipe, FusedSource, SharedRead, is_fused
from tasks.merge.stage import MergeSettings, merge
from tests.merge_helpers import as_artifact, peft_adapter

pytestmark = pytest.mark.slow


def _tensors(path: Path) -> list[tuple[str, int, tuple[int, ...], bytes]]:
    from gguf import GGUFReader

    return [
        (t.name, int(t.tensor_type), tuple(int(x) for x in t.shape), bytes(t.data.tobytes()))
        for t in GGUFReader(path).tensors
    ]


def _both(base: Path, adapter: Path, tmp: Path, vocab_pre: str | None = None, **merge_kw):
    """(streaming merged/ artifact, its GGUF, fused merged/ artifact, fused GGUF)."""
    settings = MergeSettings(base_model=str(base), **merge_kw)
    conv = ConvertSettings(vocab_pre=vocab_pre, check_tokenizer=False)
    a = as_artifact(adapter)
    merged = merge(a, settings, tmp / "s" / "merged", base_key="k")
    gguf = convert(merged, conv, tmp / "s" / "gguf", "m")
    recipe = merge(
        a, settings.model_copy(update={"fused_convert": True}), tmp / "f" / "merged", base_key="k", fused=True
    )
    fused = convert(recipe, conv, tmp / "f" / "gguf", "m")
    return merged, gguf, recipe, fused


def _assert_identical(gguf, fused) -> None:
    want, got = _tensors(Path(gguf.path)), _tensors(Path(fused.path))
    assert [t[:3] for t in got] == [t[:3] for t in want]  # same tensors, order, types, shapes
    differ = [w[0] for w, g in zip(want, got) if w[3] != g[3]]
    assert not differ, f"tensor data differs: {differ[:5]}"


def _assert_fused_record(recipe, fused, merged) -> None:
    folder = Path(recipe.path)
    assert is_fused(folder) and not list(folder.glob("*.safetensors"))
    weights = sum(f.size for f in merged.files if f.path.endswith((".safetensors", ".index.json")))
    assert 0 < recipe.size - (merged.size - weights) < 4096  # the same side files and the recipe, no weights
    r = FusedRecipe.read(folder)
    assert r.adapter_sha256 == merged.inputs["adapter"] and r.base_key == "k"
    assert recipe.meta["fused_convert"] and recipe.meta["verify_passed"]  # the logit check ran, in memory
    assert recipe.meta["max_abs_logit_diff"] == pytest.approx(merged.meta["max_abs_logit_diff"], abs=1e-5)
    check = fused.meta["fused"]["tensor_check"]
    assert check["tensors_checked"] == fused.meta["fused"]["tensors_merged"] + fused.meta["fused"]["tensors_converted"]
    assert check["tensors_checked"] > 0 and not check["failed"] and not fused.meta["fused"]["changed_not_read"]
    assert fused.inputs == {"merged": recipe.sha256}  # lineage: made from this run's recipe
    made = fused.meta["fused"]
    assert made["made_ahead"] + made["made_on_request"] == check["tensors_checked"]
    assert made["made_ahead"] > made["made_on_request"]  # the worker guessed the converter's read order


def test_llama_with_dora_is_byte_identical(llama_base, tmp_path):
    adapter = peft_adapter(
        llama_base, tmp_path / "dora", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True
    )
    merged, gguf, recipe, fused = _both(llama_base, adapter, tmp_path)
    _assert_identical(gguf, fused)
    _assert_fused_record(recipe, fused, merged)
    assert recipe.meta["use_dora"]


def test_qwen2_with_rslora_and_modules_to_save_is_byte_identical(qwen2_base, tmp_path):
    from tasks.support.tiny_models import tiny_adapter

    adapter = tiny_adapter(qwen2_base, r=4, alpha=16, use_rslora=True, modules_to_save=["lm_head"])
    merged, gguf, recipe, fused = _both(qwen2_base, adapter, tmp_path, vocab_pre="qwen2")
    _assert_identical(gguf, fused)
    _assert_fused_record(recipe, fused, merged)
    assert recipe.meta["use_rslora"] and recipe.meta["modules_to_save"] == ["lm_head"]


def test_tied_embeddings_untied_by_the_adapter_are_byte_identical(tmp_path):
    """A LoRA on the tied head: the fused source adds lm_head (it is in no base file) in the embedding's shard."""
    from tasks.support.tiny_models import tiny_model

    base = tiny_model("llama", hidden=256, tie=True)
    adapter = peft_adapter(base, tmp_path / "head", r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"])
    merged, gguf, recipe, fused = _both(base, adapter, tmp_path, dtype="bfloat16")
    _assert_identical(gguf, fused)
    _assert_fused_record(recipe, fused, merged)
    assert (
        recipe.meta["untied_head"]
        and json.loads((Path(recipe.path) / "config.json").read_text())["tie_word_embeddings"] is False
    )
    assert "output.weight" in {t[0] for t in _tensors(Path(fused.path))}


def test_the_fused_merge_stage_plans_from_the_adapters_header_without_torch(llama_base, llama_adapter, tmp_path):
    """merge.fused_convert leaves the arithmetic to the converter's process, so the merge stage (its logit check
    off) and the converter's folder read only the adapter's header and torch stays out of the flow's process.
    Before: both loaded the adapter's values, which imported torch: ~2 s of each, a third of a fused merge +
    convert of the 0.83 GB benchmark model (benchmarks/fused_bench.py)."""
    code = f"""
import sys
from pathlib import Path
from tasks.merge.fused import converter_folder
from tasks.merge.stage import MergeSettings, merge
from tests.merge_helpers import as_artifact
s = MergeSettings(base_model={str(llama_base)!r}, verify="never", fused_convert=True)
r = merge(as_artifact(Path({str(llama_adapter)!r})), s, Path({str(tmp_path / "merged")!r}), fused=True)
assert r.meta["fused_convert"] and r.meta["scalings"], r.meta
with converter_folder(Path(r.path)) as view:
    assert any(view.glob("*.safetensors"))
print("torch imported:", "torch" in sys.modules)
"""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "torch imported: False"


def test_the_header_plan_is_the_valued_plan(llama_base, tmp_path):
    """The header-only plan (load_adapter(values=False)) maps the same tensors with the same ranks, scalings and
    replacements as the plan with the values, on DoRA + modules_to_save + rsLoRA."""
    from tasks.merge.plan import HeaderTensor, build_plan, load_adapter, read_json

    adapter = peft_adapter(
        llama_base,
        tmp_path / "a",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "down_proj"],
        use_dora=True,
        use_rslora=True,
        modules_to_save=["lm_head"],
    )
    cfg = read_json(llama_base / "config.json")

    def shape_of(plan):
        ops = {
            n: [(o.module, o.kind, o.r, o.scaling, tuple(o.A.shape), o.magnitude is not None) for o in v]
            for n, v in plan.ops.items()
        }
        return ops, {n: tuple(t.shape) for n, t in plan.replace.items()}, sorted(plan.added), plan.dora

    valued = build_plan(llama_base, cfg, *load_adapter(adapter))
    header = build_plan(llama_base, cfg, *load_adapter(adapter, values=False))
    assert shape_of(header) == shape_of(valued) and valued.ops and valued.replace and valued.dora
    assert all(isinstance(o.A, HeaderTensor) for v in header.ops.values() for o in v)


def test_a_wrong_merged_tensor_fails_the_check(llama_base, llama_adapter, tmp_path, monkeypatch):
    """The per-tensor check recomputes rows from the files: a source that drops the update is caught, by name."""
    from tasks.merge.backends import streaming

    recipe = merge(
        as_artifact(llama_adapter),
        MergeSettings(base_model=str(llama_base), fused_convert=True, verify="never"),
        tmp_path / "merged",
        fused=True,
    )
    folder = Path(recipe.path)
    data = json.loads((folder / RECIPE_FILE).read_text())
    (folder / RECIPE_FILE).write_text(json.dumps({**data, "check": True}))
    source = FusedSource(FusedRecipe.read(folder))
    name = next(iter(source.plan.ops))
    assert source.produce(name) is not None  # the real merge passes
    real = streaming.merge_tensor
    monkeypatch.setattr(
        streaming, "merge_tensor", lambda plan, info, dtype, src, *a, **k: real(plan, info, dtype, src).mul(1.01)
    )
    with pytest.raises(RuntimeError, match=f"LORASHIP_FUSED_CHECK_FAILED: {name}"):
        source.produce(name)
    source.close()


def test_missing_base_is_named_before_the_converter(llama_base, llama_adapter, tmp_path):
    from tasks.support.tiny_models import copy_tree

    base = copy_tree(llama_base, tmp_path / "base")
    recipe = merge(
        as_artifact(llama_adapter),
        MergeSettings(base_model=str(base), fused_convert=True, verify="never"),
        tmp_path / "merged",
        fused=True,
    )
    import shutil

    shutil.rmtree(base)
    with pytest.raises(PermanentError, match="reads the base model from .*which is gone"):
        convert(recipe, ConvertSettings(check_tokenizer=False), tmp_path / "gguf", "m")


def test_fused_convert_needs_the_streaming_backend():
    with pytest.raises(ValueError, match="merge.fused_convert.*merge.backend is peft"):
        MergeSettings(backend="peft", fused_convert=True)


def test_merged_weights_are_written_when_a_later_stage_needs_them():
    from flows.config import parse_config
    from flows.runners import merged_weights_needed

    cfg = parse_config(
        {"model": {"name": "m"}, "source": {"kind": "local", "path": "/tmp/a"}, "merge": {"fused_convert": True}}
    )
    assert merged_weights_needed(cfg) is None
    cfg = cfg.model_copy(update={"hub": cfg.hub.model_copy(update={"include_merged": True})})
    assert merged_weights_needed(cfg) == "hub.include_merged"
    cfg = parse_config({"model": {"name": "m"}, "source": {"kind": "local", "path": "/tmp/a"}})
    assert (
        merged_weights_needed(cfg.model_copy(update={"space": cfg.space.model_copy(update={"template": "gguf_chat"})}))
        is None
    )
    space = cfg.space.model_copy(update={"template": "transformers_chat"})
    assert merged_weights_needed(cfg.model_copy(update={"space": space})) == "space.template: transformers_chat"


def test_an_update_with_nan_is_refused_naming_the_tensor(llama_base, llama_adapter, tmp_path):
    """NaN/inf is looked for once in each update's factors (not in a pass over every merged tensor)."""
    import torch

    from tasks.merge.backends.streaming import stream_merge
    from tasks.merge.plan import build_plan, load_adapter, read_json

    cfg, tensors = load_adapter(llama_adapter)
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    plan = build_plan(llama_base, read_json(llama_base / "config.json"), cfg, tensors)
    target = key.removeprefix("base_model.model.").replace(".lora_B.weight", ".weight").replace(".lora_B.default", "")
    (tmp_path / "out").mkdir()
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match=f"NaN/inf in {target}"):
        stream_merge(plan, tmp_path / "out", None)
    assert torch.get_num_threads() == threads  # the merge's thread setting is undone, also on failure


@pytest.mark.prefect
def test_in_the_flow_fused_records_rerun_cached_and_switching_off_recomputes(
    prefect_api, llama_base, llama_adapter, tmp_path
):
    """merge.fused_convert through the real flow: the recipe and the GGUF in the manifest, a cached re-run, and
    switching it off makes a new merged/ (weights) and a GGUF with the same tensor data."""
    from flows.full import full

    cfg = {
        "model": {"name": "fusedtest", "version": "v1", "base_model": str(llama_base)},
        "source": {"kind": "local", "path": str(llama_adapter)},
        "merge": {"base_model": str(llama_base), "fused_convert": True},
        "convert": {"check_tokenizer": False},
        "pipeline": {"runs_dir": str(tmp_path / "runs")},
    }
    stages = ["download", "merge", "convert"]
    first = full(config=cfg, only=stages)
    assert {s.stage: s.status for s in first.stages if s.stage in stages} == dict.fromkeys(stages, "done")
    arts = json.loads(Path(first.manifest).read_text())["artifacts"]
    merged, f16 = arts["merged"], arts["gguf:F16"]
    assert RECIPE_FILE in {f["path"] for f in merged["files"]} and not any(
        f["path"].endswith(".safetensors") for f in merged["files"]
    )
    assert f16["inputs"] == {"merged": merged["sha256"]} and f16["meta"]["fused"]["tensor_check"]["tensors_checked"]
    fused_tensors = _tensors(Path(f16["path"]))

    second = full(config=cfg, only=stages)
    assert {s.stage: s.status for s in second.stages if s.stage in ("merge", "convert")} == {
        "merge": "cached",
        "convert": "cached",
    }

    cfg["merge"]["fused_convert"] = False
    third = full(config=cfg, only=stages)
    assert next(s for s in third.stages if s.stage == "merge").status == "done"
    arts = json.loads(Path(third.manifest).read_text())["artifacts"]
    assert any(f["path"].endswith(".safetensors") for f in arts["merged"]["files"])
    assert "fused" not in arts["gguf:F16"]["meta"] and _tensors(Path(arts["gguf:F16"]["path"])) == fused_tensors


# --- the shared read: merged/ and the GGUF from one converter run ------------------------------------------


def _digests(folder: Path) -> dict[str, str]:
    import hashlib

    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


def _shared(base: Path, adapter: Path, tmp: Path, vocab_pre: str | None = None, **merge_kw):
    """(streaming merged/, its GGUF, shared-read merged/, the convert stage's record of the GGUF it reused)."""
    settings = MergeSettings(base_model=str(base), **merge_kw)
    conv = ConvertSettings(vocab_pre=vocab_pre, check_tokenizer=False)
    a = as_artifact(adapter)
    merged = merge(a, settings, tmp / "s" / "merged", base_key="k")
    gguf = convert(merged, conv, tmp / "s" / "gguf", "m")
    shared = SharedRead.of(conv, "m", tmp / "sh" / "gguf")
    both = merge(
        a, settings.model_copy(update={"fused_convert": True}), tmp / "sh" / "merged", base_key="k", shared=shared
    )
    reused = convert(both, conv, tmp / "sh" / "gguf", "m")
    return merged, gguf, both, reused


def _assert_shared(merged, gguf, both, reused) -> None:
    # merged/: every file byte for byte (shards with their headers, the index, config, tokenizer): the same digest
    assert _digests(Path(both.path)) == _digests(Path(merged.path))
    assert both.sha256 == merged.sha256 and RECIPE_FILE not in {f.path for f in both.files}
    for k in ("tensors_merged", "tensors_copied", "tensors_converted", "tensors_qlora_roundtrip", "weights_bytes"):
        assert both.meta[k] == merged.meta[k], k
    assert both.meta["shared_read"] and both.meta["verify_passed"]  # the merge stage's checks ran on merged/
    assert both.meta["tensor_check"]["tensors_checked"] == merged.meta["tensor_check"]["tensors_checked"] > 0
    # the GGUF: not converted again, byte-identical to converting the streaming-merged folder
    assert reused.meta["reused_from_merge"] and reused.inputs == {"merged": both.sha256}
    assert reused.sha256 == both.meta["premade_gguf"]["sha256"]
    _assert_identical(gguf, reused)
    assert Path(reused.path).read_bytes() == Path(gguf.path).read_bytes()
    made = reused.meta["fused"]
    assert made["tensors_merged"] == merged.meta["tensors_merged"] and not made["changed_not_read"]


def test_shared_read_llama_with_dora(llama_base, tmp_path):
    adapter = peft_adapter(
        llama_base, tmp_path / "dora", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True
    )
    merged, gguf, both, reused = _shared(llama_base, adapter, tmp_path)
    _assert_shared(merged, gguf, both, reused)
    assert both.meta["use_dora"] and both.meta["tensors_copied"] > 0


def test_shared_read_qwen2_with_rslora_and_modules_to_save(qwen2_base, tmp_path):
    from tasks.support.tiny_models import tiny_adapter

    adapter = tiny_adapter(qwen2_base, r=4, alpha=16, use_rslora=True, modules_to_save=["lm_head"])
    merged, gguf, both, reused = _shared(qwen2_base, adapter, tmp_path, vocab_pre="qwen2")
    _assert_shared(merged, gguf, both, reused)
    assert both.meta["use_rslora"] and both.meta["tensors_copied"] > 0


def test_shared_read_tied_head_bf16(tmp_path):
    """A bf16 base with a tied head the adapter unties: lm_head is added (the embedding's bytes + its update),
    and the tensors the merge does not change are copied from the base into merged/ and counted."""
    from tasks.support.tiny_models import tiny_model

    base = tiny_model("llama", hidden=256, tie=True, dtype="bfloat16")
    adapter = peft_adapter(base, tmp_path / "head", r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"])
    merged, gguf, both, reused = _shared(base, adapter, tmp_path)
    _assert_shared(merged, gguf, both, reused)
    assert both.meta["untied_head"] and both.meta["tensors_copied"] > 0
    assert both.meta["tensors_converted"] == 0  # bf16 in, bf16 out: nothing cast


def test_shared_read_gguf_not_reused_with_other_settings(llama_base, llama_adapter, tmp_path):
    """A premade GGUF made with another outtype, or changed on disk, is not taken: merged/ is converted."""
    a = as_artifact(llama_adapter)
    conv = ConvertSettings(check_tokenizer=False)
    both = merge(
        a,
        MergeSettings(base_model=str(llama_base), fused_convert=True, verify="never"),
        tmp_path / "merged",
        shared=SharedRead.of(conv, "m", tmp_path / "gguf"),
    )
    premade = Path(both.meta["premade_gguf"]["path"])
    assert premade == (tmp_path / "gguf" / "m-F16.gguf").resolve() and premade.is_file()
    other = convert(both, conv.model_copy(update={"outtype": "bf16"}), tmp_path / "gguf", "m")
    assert "reused_from_merge" not in other.meta and Path(other.path).name == "m-BF16.gguf"
    with open(premade, "r+b") as fh:  # same size, other bytes: the digest decides
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    again = convert(both, conv, tmp_path / "gguf", "m")
    assert "reused_from_merge" not in again.meta and again.sha256 == both.meta["premade_gguf"]["sha256"]


@pytest.mark.prefect
def test_in_the_flow_the_shared_read_converts_once_and_follows_a_changed_adapter(prefect_api, llama_base, tmp_path):
    """merge.fused_convert + a setting that needs merged/ (hub.include_merged): the merge stage writes merged/ and
    the GGUF, the convert stage reuses the GGUF (no second converter run); a re-run is cached; a changed adapter
    makes a new merged/ and a new GGUF, again reused, whose record follows the new merged/."""
    import shutil

    from flows.full import full
    from tasks.gguf import convert as convert_mod

    src = tmp_path / "adapter"
    shutil.copytree(peft_adapter(llama_base, tmp_path / "a1", r=4, lora_alpha=8, target_modules=["q_proj"]), src)
    cfg = {
        "model": {"name": "sharedtest", "version": "v1", "base_model": str(llama_base)},
        "source": {"kind": "local", "path": str(src)},
        "merge": {"base_model": str(llama_base), "fused_convert": True},
        "convert": {"check_tokenizer": False},
        "hub": {"include_merged": True},
        "pipeline": {"runs_dir": str(tmp_path / "runs")},
    }
    stages = ["download", "merge", "convert"]
    runs: list[list[str]] = []
    real = convert_mod._run_converter

    def counting(cmd, env, timeout_s):
        runs.append(cmd)
        return real(cmd, env, timeout_s)

    convert_mod._run_converter = counting
    try:
        first = full(config=cfg, only=stages)
        assert {s.stage: s.status for s in first.stages if s.stage in stages} == dict.fromkeys(stages, "done")
        assert len(runs) == 1 and "--write-merged" in runs[0]  # one converter run, in the merge stage
        arts = json.loads(Path(first.manifest).read_text())["artifacts"]
        merged, f16 = arts["merged"], arts["gguf:F16"]
        assert any(f["path"].endswith(".safetensors") for f in merged["files"]) and merged["meta"]["shared_read"]
        assert f16["meta"]["reused_from_merge"] and f16["inputs"] == {"merged": merged["sha256"]}
        assert f16["sha256"] == merged["meta"]["premade_gguf"]["sha256"]
        first_tensors = _tensors(Path(f16["path"]))

        second = full(config=cfg, only=stages)
        assert {s.stage: s.status for s in second.stages if s.stage in ("merge", "convert")} == {
            "merge": "cached",
            "convert": "cached",
        }
        assert len(runs) == 1

        shutil.rmtree(src)  # a changed adapter: new merged/, new GGUF, reused again, in the new lineage
        shutil.copytree(
            peft_adapter(llama_base, tmp_path / "a2", seed=7, r=4, lora_alpha=8, target_modules=["q_proj"]), src
        )
        third = full(config=cfg, only=stages)
        assert {s.stage: s.status for s in third.stages if s.stage in stages} == dict.fromkeys(stages, "done")
        assert len(runs) == 2
        arts3 = json.loads(Path(third.manifest).read_text())["artifacts"]
        assert arts3["merged"]["sha256"] != merged["sha256"]
        assert arts3["gguf:F16"]["meta"]["reused_from_merge"]
        assert arts3["gguf:F16"]["inputs"] == {"merged": arts3["merged"]["sha256"]}
        assert arts3["gguf:F16"]["sha256"] == arts3["merged"]["meta"]["premade_gguf"]["sha256"] != f16["sha256"]
        assert _tensors(Path(arts3["gguf:F16"]["path"])) != first_tensors
    finally:
        convert_mod._run_converter = real
