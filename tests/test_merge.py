"""The merge stage on tiny real Llama, Qwen2 and GPT-2 models with real peft adapters.

Every reference here is real: peft's own merge_and_unload (the `peft` backend), PeftModel(base, adapter)
logits, and the tensors written to disk. Only the unsloth path is not exercised on a GPU: this machine
has no CUDA, so the test checks that it fails at once with a useful message.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from tasks.core.disk import disk_preflight
from tasks.core.errors import PermanentError
from tasks.merge.stage import MergeSettings, merge, resolve_base
from tests.merge_helpers import as_artifact, bf16_ulp, copy_model, load_weights, peft_adapter, tiny_gpt2

NEVER = dict(verify="never")


@pytest.fixture(scope="module")
def bf16_llama() -> tuple[Path, Path]:
    from tasks.support.tiny_models import tiny_adapter, tiny_model

    base = tiny_model("llama", hidden=256, dtype="bfloat16")
    return base, tiny_adapter(base, r=8, alpha=16)


def _merge(adapter: Path, base: Path, out: Path, **kw) -> object:
    return merge(as_artifact(adapter), MergeSettings(base_model=str(base), **kw), out / "merged")


def test_streaming_equals_peft_within_one_bf16_ulp(bf16_llama, tmp_path):
    base, adapter = bf16_llama
    s = _merge(adapter, base, tmp_path / "s", **NEVER)
    p = _merge(adapter, base, tmp_path / "p", backend="peft", **NEVER)
    ws, wp, wb = load_weights(Path(s.path)), load_weights(Path(p.path)), load_weights(base)
    assert set(ws) == set(wb) and s.meta["dtype"] == "bfloat16"
    changed = 0
    for name, t in ws.items():
        assert t.dtype == wb[name].dtype == wp[name].dtype, name
        diff = (t.float() - wp[name].float()).abs()
        # one ulp at the weight's scale (base or merged value, whichever is larger): peft rounds the update
        # to bf16 before adding it, streaming rounds once, so where an update cancels most of a weight
        # the two can differ by more than one ulp of the (small) result.
        scale = t.float().abs().maximum(wp[name].float().abs()).maximum(wb[name].float().abs())
        ulp = bf16_ulp(scale)
        assert bool((diff <= ulp).all()), f"{name}: {int((diff > ulp).sum())} weights differ by more than one bf16 ulp"
        if "proj" in name:
            assert not bool((t == wb[name]).all()), f"{name} was not merged"
            changed += 1
        else:
            assert bool((t == wb[name]).all()), f"{name} should be unchanged"
    assert changed == 14 and s.meta["tensors_merged"] == 14 and s.meta["tensors_copied"] == 7
    assert s.name == s.kind == "merged" and s.inputs["adapter"]


def test_qwen2_merged_loads_and_matches_peft_logits(qwen2_base, qwen2_adapter, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    art = _merge(qwen2_adapter, qwen2_base, tmp_path)
    out = Path(art.path)
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja", "model.safetensors"} <= {
        f.path for f in art.files
    }
    assert art.meta["max_abs_logit_diff"] is not None and art.meta["max_abs_logit_diff"] < 1e-3
    assert (
        art.meta["adapter_effect_max_abs_logit"] > 100 * art.meta["max_abs_logit_diff"]
    )  # the merge kept the adapter's effect
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template and model.config.model_type == "qwen2"
    # Qwen2 has q/k/v biases: untouched by a LoRA without lora_bias, copied as they were
    wb, wm = load_weights(qwen2_base), load_weights(out)
    assert bool((wb["model.layers.0.self_attn.q_proj.bias"] == wm["model.layers.0.self_attn.q_proj.bias"]).all())
    assert not any(p.name.startswith(".partial-") for p in tmp_path.iterdir())


def test_rslora_scaling(llama_base, tmp_path):
    from tasks.support.tiny_models import tiny_adapter

    adapter = tiny_adapter(llama_base, r=4, alpha=16, use_rslora=True, targets=["q_proj", "v_proj"])
    art = _merge(adapter, llama_base, tmp_path)
    assert art.meta["use_rslora"] and art.meta["scalings"] == [16 / math.sqrt(4)]  # 8.0, not alpha/r = 4.0
    ad = load_weights(adapter)
    name = "model.layers.1.self_attn.v_proj.weight"
    a = ad["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    b = ad["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    expected = load_weights(llama_base)[name] + 8.0 * (b @ a)
    assert float((load_weights(Path(art.path))[name] - expected).abs().max()) < 1e-6
    assert art.meta["max_abs_logit_diff"] < 1e-3


def test_modules_to_save_are_copied(llama_base, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from tasks.support.tiny_models import copy_tree, tiny_adapter

    adapter = copy_tree(tiny_adapter(llama_base, modules_to_save=["lm_head"]), tmp_path / "adapter")
    f = adapter / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = "base_model.model.lm_head.weight"
    tensors[key] = tensors[key] + 0.5 * torch.randn_like(tensors[key])  # "trained" head, visibly different
    save_file(tensors, str(f), metadata={"format": "pt"})
    art = _merge(adapter, llama_base, tmp_path / "out")
    merged = load_weights(Path(art.path))
    assert torch.equal(merged["lm_head.weight"], tensors[key])
    assert not torch.equal(merged["lm_head.weight"], load_weights(llama_base)["lm_head.weight"])
    assert art.meta["modules_to_save"] == ["lm_head"] and art.meta["max_abs_logit_diff"] < 1e-3


def test_tied_embeddings_preserved_with_fan_in_fan_out(tmp_path):
    """GPT-2: Conv1D weights are stored [in, out] (fan_in_fan_out) and lm_head is tied to wte."""
    base = tiny_gpt2(tmp_path / "gpt2")
    adapter = peft_adapter(
        base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
    )
    s = _merge(adapter, base, tmp_path / "s")
    p = _merge(adapter, base, tmp_path / "p", backend="peft", **NEVER)
    ws, wp = load_weights(Path(s.path)), load_weights(Path(p.path))
    assert "lm_head.weight" not in ws and s.meta["tied_embeddings"] and s.meta["fan_in_fan_out"]
    assert json.loads((Path(s.path) / "config.json").read_text())["tie_word_embeddings"] is True
    for name in ("h.0.attn.c_attn.weight", "h.1.mlp.c_fc.weight"):
        full = name if name in ws else f"transformer.{name}"
        assert float((ws[full] - wp[full]).abs().max()) < 1e-6
    assert s.meta["max_abs_logit_diff"] < 1e-3


def test_dora_merged_like_peft(llama_base, tmp_path):
    adapter = peft_adapter(
        llama_base, tmp_path / "dora", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True
    )
    art = _merge(adapter, llama_base, tmp_path)
    assert art.meta["use_dora"]
    assert art.meta["max_abs_logit_diff"] < 1e-3 < art.meta["adapter_effect_max_abs_logit"]


def test_lora_on_embeddings(llama_base, tmp_path):
    adapter = peft_adapter(llama_base, tmp_path / "emb", r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"])
    art = _merge(adapter, llama_base, tmp_path)
    assert art.meta["max_abs_logit_diff"] < 1e-3 < art.meta["adapter_effect_max_abs_logit"]


def test_mismatched_adapter_names_tensor_and_shapes(llama_base, tmp_path):
    from tasks.support.tiny_models import tiny_model

    other = tiny_model("llama", hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256)
    adapter = peft_adapter(other, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(PermanentError) as err:
        _merge(adapter, llama_base, tmp_path / "out")
    msg = str(err.value)
    assert "q_proj" in msg and "[4, 128]" in msg and "[256, 256]" in msg, msg
    assert not (tmp_path / "out" / "merged").exists()


def test_missing_target_module_is_named(llama_base, qwen2_base, tmp_path):
    adapter = peft_adapter(llama_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "query_key_value"]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PermanentError, match="query_key_value"):
        _merge(adapter, llama_base, tmp_path / "out")


def test_truncated_base_fails_clearly_and_leaves_no_merged(llama_base, llama_adapter, tmp_path):
    base = copy_model(llama_base, tmp_path / "base")
    shard = base / "model.safetensors"
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)
    with pytest.raises(PermanentError, match="model.safetensors is truncated"):
        _merge(llama_adapter, base, tmp_path / "out")
    assert not (tmp_path / "out" / "merged").exists()
    assert not list((tmp_path / "out").glob(".partial-*"))


def test_failure_keeps_previous_merged(llama_base, llama_adapter, tmp_path):
    first = _merge(llama_adapter, llama_base, tmp_path, **NEVER)
    base = copy_model(llama_base, tmp_path / "base")
    with open(base / "model.safetensors", "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(PermanentError):
        _merge(llama_adapter, base, tmp_path, **NEVER)
    assert first.is_intact(full=True)


def test_adapter_base_mismatch_warns_or_fails(llama_base, llama_adapter, tmp_path, caplog):
    other = copy_model(llama_base, tmp_path / "some-other-model")
    with pytest.raises(PermanentError, match="trained on"):
        _merge(llama_adapter, other, tmp_path / "strict", strict_base=True, **NEVER)
    with caplog.at_level(logging.WARNING, logger="loraship.merge"):
        art = _merge(llama_adapter, other, tmp_path / "lenient", **NEVER)
    assert "trained on" in caplog.text and art.kind == "merged"


def test_unsloth_without_cuda_fails_naming_other_backends(llama_base, llama_adapter, tmp_path):
    with pytest.raises(PermanentError) as err:
        _merge(llama_adapter, llama_base, tmp_path, backend="unsloth")
    assert "CUDA" in str(err.value) and "streaming" in str(err.value) and "peft" in str(err.value)
    assert not (tmp_path / "merged").exists()


def test_dtype_conversion_to_float16(llama_base, llama_adapter, tmp_path):
    import torch

    art = _merge(llama_adapter, llama_base, tmp_path, dtype="float16")
    w = load_weights(Path(art.path))
    assert all(t.dtype == torch.float16 for t in w.values())
    assert json.loads((Path(art.path) / "config.json").read_text())["dtype"] == "float16"
    assert art.meta["max_abs_logit_diff"] < 0.02 * art.meta["reference_max_abs_logit"]


def test_sharded_base_keeps_shards_and_index(tmp_path):
    from tasks.support.tiny_models import tiny_adapter, tiny_model

    base = tiny_model("llama", hidden=256, shard_size="2MB")
    assert (base / "model.safetensors.index.json").exists()
    adapter = tiny_adapter(base, r=4, alpha=8)
    art = _merge(adapter, base, tmp_path)
    out = Path(art.path)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"] and art.meta["shards"] >= 2
    assert index["metadata"]["total_size"] == sum(
        (out / f).stat().st_size for f in set(index["weight_map"].values())
    ) - sum(8 + int.from_bytes((out / f).read_bytes()[:8], "little") for f in set(index["weight_map"].values()))
    assert art.meta["max_abs_logit_diff"] < 1e-3


def test_disk_preflight_refuses_before_writing(tmp_path):
    with pytest.raises(PermanentError, match="not enough disk space"):
        disk_preflight(tmp_path, needed=5 * 10**9, free=10**9)
    disk_preflight(tmp_path, needed=10**6, free=10**9)


def test_hub_id_resolves_from_the_local_cache(llama_base, tmp_path):
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / "models--loraship-test--tiny-llama"
    snap = repo / "snapshots" / ("a" * 40)
    copy_model(llama_base, snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("a" * 40)
    assert resolve_base("loraship-test/tiny-llama") == snap
    assert resolve_base("loraship-test/not-cached", download=False) is None


def test_rank_and_alpha_patterns(llama_base, tmp_path):
    adapter = peft_adapter(
        llama_base,
        tmp_path / "adapter",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"q_proj": 2},
        alpha_pattern={"q_proj": 32},
    )
    art = _merge(adapter, llama_base, tmp_path)
    assert art.meta["scalings"] == [2.0, 16.0]  # v_proj 8/4, q_proj 32/2
    assert art.meta["max_abs_logit_diff"] < 1e-3 < art.meta["adapter_effect_max_abs_logit"]


def test_verification_fails_a_merge_with_one_layer_scaled_wrong(bf16_llama, tmp_path, monkeypatch):
    """One layer's update applied at twice its scale, on a bf16 model (rounding allowance > 0): the per-tensor check
    names the tensor; the same wrong scale coming from the plan (both checks see it) fails the logit check."""
    import tasks.merge.backends.streaming as streaming
    import tasks.merge.plan as plan_mod

    base, adapter = bf16_llama
    good = _merge(adapter, base, tmp_path / "good")
    assert good.meta["verify_passed"] and 0 < good.meta["rounding_allowance"] <= good.meta["max_abs_logit_diff"] * 2
    assert good.meta["max_abs_logit_diff"] <= good.meta["verify_limit"] < good.meta["adapter_effect_max_abs_logit"]
    assert good.meta["tensor_check"]["tensors_checked"] == 21 and not good.meta["tensor_check"]["failed"]
    wrong = "model.layers.1.self_attn.v_proj"
    apply_ops = streaming.apply_ops

    def buggy(w, ops):  # a backend bug: one layer's scale doubled
        for op in ops:
            if op.module.endswith(wrong):
                w.addmm_(op.B.float(), op.A.float(), alpha=op.scaling)
        return apply_ops(w, ops)

    monkeypatch.setattr(streaming, "apply_ops", buggy)
    with pytest.raises(PermanentError) as err:
        _merge(adapter, base, tmp_path / "backend-bug")
    assert f"{wrong}.weight" in str(err.value) and "ulps" in str(err.value)
    assert not (tmp_path / "backend-bug" / "merged").exists()
    monkeypatch.setattr(streaming, "apply_ops", apply_ops)

    scaling_for = plan_mod.scaling_for
    monkeypatch.setattr(
        plan_mod, "scaling_for", lambda cfg, m, r: scaling_for(cfg, m, r) * (2 if m.endswith(wrong) else 1)
    )
    with pytest.raises(PermanentError, match="logits differ from PeftModel") as err:
        _merge(adapter, base, tmp_path / "plan-bug")
    assert "rounding allowance" in str(err.value)
    assert not (tmp_path / "plan-bug" / "merged").exists()


def test_tensor_check_takes_tensors_as_a_fused_path_makes_them(bf16_llama):
    """The per-tensor check on tensors in memory (issue 21's fused merge->GGUF calls it that way)."""
    import torch

    from tasks.merge.plan import build_plan, load_adapter, read_json
    from tasks.merge.tensor_check import TensorVerifier

    base, adapter = bf16_llama
    cfg, tensors = load_adapter(adapter)
    plan = build_plan(base, read_json(base / "config.json"), cfg, tensors)
    weights = load_weights(base)
    name = "model.layers.0.mlp.down_proj.weight"
    (op,) = plan.ops[name]
    right = (weights[name].float() + op.scaling * (op.B.float() @ op.A.float())).to(torch.bfloat16)
    with TensorVerifier(plan) as v:
        assert v.check_tensor(name, right).ok
        assert not v.check_tensor(name, weights[name]).ok  # the update missing
        assert not v.check_tensor(name, right.t().contiguous().reshape(right.shape)).ok  # transposed
        assert v.check_tensor("model.norm.weight", weights["model.norm.weight"]).ok


def test_embedding_lora_rows_are_all_run_through_the_logit_check(llama_base, tmp_path):
    """A LoRA on embed_tokens changes the rows of the tokens it trained on (non-zero lora_embedding_A columns); the
    logit check runs every one of them, so a wrong row the fixed prompts never use is caught."""
    import torch
    from safetensors.torch import load_file, save_file

    from tasks.merge.verify import verification_problem, verify_logits

    adapter = peft_adapter(llama_base, tmp_path / "emb", r=4, lora_alpha=8, target_modules=["embed_tokens"])
    f = adapter / "adapter_model.safetensors"
    t = load_file(str(f))
    key = next(k for k in t if "lora_embedding_A" in k)
    trained = [300, 301, 333, 350, 370]  # tokens no fixed prompt holds
    t[key][:, trained] = torch.randn(t[key].shape[0], len(trained))
    save_file(t, str(f), metadata={"format": "pt"})
    art = _merge(adapter, llama_base, tmp_path / "out")
    assert art.meta["embedding_rows_changed"] == art.meta["embedding_rows_covered"] == len(trained)
    assert art.meta["max_abs_logit_diff"] < 1e-3 < art.meta["adapter_effect_max_abs_logit"]
    # corrupt one trained row of the written embedding: the logit check must see it
    out = Path(art.path) / "model.safetensors"
    w = load_file(str(out))
    w["model.embed_tokens.weight"][350] = load_weights(llama_base)["model.embed_tokens.weight"][350]
    save_file(w, str(out), metadata={"format": "pt"})
    from tasks.merge.plan import build_plan, load_adapter, read_json

    cfg, tensors = load_adapter(adapter)
    plan = build_plan(llama_base, read_json(llama_base / "config.json"), cfg, tensors)
    result = verify_logits(llama_base, adapter, Path(art.path), plan)
    assert verification_problem(result, 0.001) is not None


def test_tied_lm_head_lora_is_untied_and_equals_peftmodel_at_every_position(tmp_path):
    """A LoRA on a tied lm_head: lm_head = E + s·B·A on its own, the embedding unchanged, tie_word_embeddings false;
    the merged model's logits equal PeftModel(base, adapter) at all positions (both backends); the GGUF keeps a
    separate output tensor."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.support.tiny_models import tiny_model

    base = tiny_model("llama", hidden=256, tie=True)
    assert "lm_head.weight" not in load_weights(base)
    adapter = peft_adapter(base, tmp_path / "head", r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"])
    tok = AutoTokenizer.from_pretrained(str(base))
    ids = tok("Tell me a story about a cat, a dog and an owl. 1 2 3", return_tensors="pt")["input_ids"]
    ref_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits
    wb = load_weights(base)
    for backend in ("streaming", "peft"):
        art = _merge(adapter, base, tmp_path / backend, backend=backend)
        out = Path(art.path)
        w = load_weights(out)
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False and art.meta["untied_head"]
        assert torch.equal(w["model.embed_tokens.weight"], wb["model.embed_tokens.weight"])
        assert not torch.equal(w["lm_head.weight"], wb["model.embed_tokens.weight"])
        merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        with torch.no_grad():
            got = merged(input_ids=ids).logits
        assert float((got - ref).abs().max()) < 1e-4, backend  # every position, not just the last
        assert art.meta["max_abs_logit_diff"] < 1e-4 and art.meta["tensor_check"]["tensors_checked"] == len(wb) + 1
    # an embedding LoRA on the tied model: the head keeps the original E
    emb = peft_adapter(base, tmp_path / "emb", r=4, lora_alpha=8, target_modules=["embed_tokens"])
    from safetensors.torch import load_file, save_file

    t = load_file(str(emb / "adapter_model.safetensors"))
    key = next(k for k in t if "lora_embedding_A" in k)
    t[key][:, :40] = torch.randn(t[key].shape[0], 40)
    save_file(t, str(emb / "adapter_model.safetensors"), metadata={"format": "pt"})
    art = _merge(emb, base, tmp_path / "emb-out")
    w = load_weights(Path(art.path))
    assert torch.equal(w["lm_head.weight"], wb["model.embed_tokens.weight"]) and art.meta["untied_head"]
    assert art.meta["max_abs_logit_diff"] < 1e-4 < art.meta["adapter_effect_max_abs_logit"]


@pytest.mark.slow
def test_untied_head_survives_the_gguf_conversion(tmp_path):
    """The converted GGUF has its own output tensor, equal (in F16) to the merged lm_head, not the embedding."""
    import numpy as np
    from gguf import GGUFReader

    from tasks.gguf.convert import ConvertSettings, convert
    from tasks.support.tiny_models import tiny_model

    base = tiny_model("llama", hidden=256, tie=True)
    adapter = peft_adapter(base, tmp_path / "head", r=4, lora_alpha=8, target_modules=["lm_head"])
    art = _merge(adapter, base, tmp_path / "m")
    f16 = convert(art, ConvertSettings(), tmp_path / "gguf", "tied")
    tensors = {t.name: t for t in GGUFReader(f16.path).tensors}
    assert "output.weight" in tensors
    out = np.asarray(tensors["output.weight"].data, dtype=np.float32)
    emb = np.asarray(tensors["token_embd.weight"].data, dtype=np.float32)
    head = load_weights(Path(art.path))["lm_head.weight"].float().numpy()
    assert np.abs(out.reshape(head.shape) - head).max() < 1e-2 and np.abs(out - emb).max() > 1e-2
