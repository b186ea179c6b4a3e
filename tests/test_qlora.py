"""QLoRA: the 4-bit format read from the training records, and the round trip compared with bitsandbytes itself.

bitsandbytes 0.50 installs and runs on this CPU (its CPU kernels and torch fallbacks), so the round trip is
compared with its own quantize_4bit/dequantize_4bit, not with numbers written down here. One known difference:
with double quantization of float16/float32 weights, bitsandbytes' native CPU kernel for the 8-bit absmax
quantization does not always pick the nearest code (its binary search; the CUDA kernel, where QLoRA trains,
and its torch fallback do); there the test checks that our choice is the nearest one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import bitsandbytes.functional as bnb_f
import pytest

from tasks.merge import qlora as q4
from tasks.merge.stage import MergeSettings, merge
from tests.merge_helpers import as_artifact, load_weights, peft_adapter

FORMATS = [
    q4.QLoraFormat(quant_type=t, blocksize=b, double_quant=d) for t in ("nf4", "fp4") for b in (64, 128) for d in (0, 1)
]


def test_code_books_are_bitsandbytes():
    import torch

    for name, code in q4.CODE_BOOKS.items():
        theirs = sorted(bnb_f.get_4bit_type(name, device="cpu").tolist())
        assert torch.equal(torch.tensor(code, dtype=torch.float32), torch.tensor(theirs, dtype=torch.float32)), name
    assert torch.equal(torch.tensor(q4.dynamic_map(), dtype=torch.float32), bnb_f.create_dynamic_map())


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.tag)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_roundtrip_equals_bitsandbytes(fmt, dtype):
    import torch

    torch.manual_seed(0)
    w = (torch.randn(512, 384) * 0.05).to(getattr(torch, dtype))
    packed, state = bnb_f.quantize_4bit(
        w, blocksize=fmt.blocksize, quant_type=fmt.quant_type, compress_statistics=fmt.double_quant
    )
    theirs = bnb_f.dequantize_4bit(packed, state).float()
    ours = q4.roundtrip(w, fmt).to(w.dtype).float()  # bitsandbytes hands back the weight's dtype
    if not fmt.double_quant or dtype == "bfloat16":
        assert torch.equal(ours, theirs)
        return
    # double quant, fp16/fp32: where the native CPU kernel's 8-bit absmax code is not the nearest, ours is
    offset, dyn = state.offset, torch.tensor(q4.dynamic_map())
    absmax = w.float().reshape(-1, fmt.blocksize).abs().amax(1)
    centred = absmax - offset
    scale2 = state.state2.absmax.repeat_interleave(256)[: len(absmax)]
    x = centred / scale2
    theirs_idx = state.absmax.long()
    ours_idx = torch.bucketize(x.clamp(-1, 1), (dyn[1:] + dyn[:-1]) / 2)
    differ = ours_idx != theirs_idx
    assert int(differ.sum()) < 0.02 * len(absmax)
    assert bool(((x - dyn[ours_idx]).abs() <= (x - dyn[theirs_idx]).abs()).all())
    same_blocks = (~differ).repeat_interleave(fmt.blocksize)
    assert torch.equal(ours.reshape(-1)[same_blocks], theirs.reshape(-1)[same_blocks])


def _adapter(base: Path, out: Path, records: dict | None = None, name: str | None = None) -> Path:
    adapter = peft_adapter(base, out, r=4, lora_alpha=8, target_modules=["q_proj"])
    if records is not None:
        (adapter / "training_args.json").write_text(json.dumps(records))
    if name is not None:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = name
        (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    return adapter


def test_format_is_read_from_training_records_and_the_base_config(tmp_path):
    keys = {"model_init_kwargs": {"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
                                                           "bnb_4bit_use_double_quant": True}}}  # fmt: skip
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "training_args.json").write_text(json.dumps(keys))
    found = q4.detect(tmp_path / "a", {})
    assert found.source == "metadata" and found.format == q4.QLoraFormat(quant_type="fp4", double_quant=True)
    # the base the adapter names, on this machine, with its quantization_config
    qbase = tmp_path / "llama-bnb-4bit"
    qbase.mkdir()
    qcfg = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (qbase / "config.json").write_text(json.dumps({"quantization_config": {**qcfg, "bnb_4bit_use_double_quant": 1}}))
    (tmp_path / "b").mkdir()
    found = q4.detect(tmp_path / "b", {"base_model_name_or_path": str(qbase)})
    assert found.source == "base_config" and found.format.tag == "nf4-b64-dq"
    # the name alone: a hint, no format
    found = q4.detect(tmp_path / "b", {"base_model_name_or_path": "unsloth/never-cached-bnb-4bit"})
    assert found.source == "name" and found.format is None
    assert q4.detect(tmp_path / "b", {"base_model_name_or_path": "meta-llama/Llama-3.2-1B"}) is None
    # transformers' BitsAndBytesConfig defaults when only load_in_4bit is recorded: fp4, no double quant
    assert q4.format_from_keys({"load_in_4bit": True}) == q4.QLoraFormat(quant_type="fp4")
    assert q4.format_from_keys({"load_in_8bit": True}) is None


def test_name_only_warns_and_keeps_the_16_bit_weights(llama_base, tmp_path, caplog):
    import torch

    adapter = _adapter(llama_base, tmp_path / "ad", name="someone/tiny-llama-bnb-4bit")
    with caplog.at_level(logging.WARNING, logger="loraship.merge"):
        art = merge(as_artifact(adapter), MergeSettings(base_model=str(llama_base)), tmp_path / "o" / "merged")
    assert "merge.qlora: roundtrip" in caplog.text and art.meta["qlora_base"] == "original"
    assert art.meta["qlora_source"] == "name"
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(load_weights(Path(art.path))[name], load_weights(llama_base)[name])
    forced = merge(
        as_artifact(adapter),
        MergeSettings(
            base_model=str(llama_base), qlora="roundtrip", qlora_format={"quant_type": "fp4"}, verify="never"
        ),
        tmp_path / "f" / "merged",
    )
    assert forced.meta["qlora_base"] == "fp4-b64-roundtrip"


@pytest.mark.parametrize("backend", ["streaming", "peft"])
def test_merge_into_the_recorded_format_and_verify_against_peftmodel_on_it(llama_base, tmp_path, caplog, backend):
    """fp4 + double quantization recorded in training_args.json: the base's linear weights become exactly that
    round trip; both checks run against PeftModel on the same round-tripped base and pass."""
    import torch

    records = {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True}
    adapter = _adapter(llama_base, tmp_path / "ad", records)
    with caplog.at_level(logging.INFO, logger="loraship.merge"):
        art = merge(
            as_artifact(adapter), MergeSettings(base_model=str(llama_base), backend=backend), tmp_path / "o" / "merged"
        )
    assert "FP4, block 64, double quant" in caplog.text
    assert art.meta["qlora_base"] == "fp4-b64-dq-roundtrip" and art.meta["qlora_source"] == "metadata"
    fmt = q4.QLoraFormat(quant_type="fp4", double_quant=True)
    base_w, rt_w = load_weights(llama_base), load_weights(Path(art.path))
    name = "model.layers.0.mlp.up_proj.weight"  # not a LoRA target: only the round trip changes it
    assert torch.equal(rt_w[name], q4.roundtrip(base_w[name], fmt).to(base_w[name].dtype))
    assert not torch.equal(rt_w[name], q4.roundtrip(base_w[name], q4.QLoraFormat()).to(base_w[name].dtype))
    assert torch.equal(rt_w["model.embed_tokens.weight"], base_w["model.embed_tokens.weight"])  # not quantized
    assert art.meta["verify_passed"] and art.meta["max_abs_logit_diff"] < 1e-3
    assert not art.meta["tensor_check"]["failed"]
