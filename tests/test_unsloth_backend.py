"""The unsloth merge backend's decisions, checked without a GPU (issue 19; the GPU run is benchmarks/gpu_check.py).

What unsloth is asked to load is decided from the stage's job: the base the stage resolved from
merge.base_model (never the adapter's base_model_name_or_path), merge.dtype, and the QLoRA choice with its
bitsandbytes format; what cannot be honoured fails before loading. What unsloth reports having loaded is
read from a real transformers model here (unsloth returns one) and compared with the request. On this
machine the stage fails at once (no CUDA): tests/test_merge_backends.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tasks.core.errors import PermanentError
from tasks.merge.backends.base import MergeJob
from tasks.merge.backends.unsloth import UnslothLoad, check_loaded, load_plan, loaded_facts
from tasks.merge.qlora import QLoraFormat


@pytest.fixture
def trained_elsewhere(llama_adapter: Path, tmp_path: Path) -> Path:
    """The fixture adapter as training boxes leave it: its base named by a path that exists only there."""
    out = tmp_path / "adapter"
    shutil.copytree(llama_adapter, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "/workspace/train/llama-bnb-4bit"
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def _job(base: Path, adapter: Path, dtype: str = "bfloat16", qlora: QLoraFormat | None = None) -> MergeJob:
    return MergeJob(
        adapter_dir=adapter,
        base_dir=base,
        base_ref=str(base),
        plan=None,
        dtype=dtype,
        target_st=None,
        qlora=qlora,
        max_shard_size="5GB",
    )


def test_unsloth_loads_the_stages_base_in_the_stages_dtype(llama_base: Path, trained_elsewhere: Path) -> None:
    import torch

    load = load_plan(_job(llama_base, trained_elsewhere, dtype="float16"))
    assert load == UnslothLoad(model_name=str(llama_base), dtype="float16", load_in_4bit=False)
    kw = load.kwargs()
    assert kw["model_name"] == str(llama_base) and kw["dtype"] is torch.float16
    assert kw["use_exact_model_name"] is True  # no swap for unsloth's own pre-quantized copy
    assert kw["load_in_4bit"] is False and kw["load_in_16bit"] is True and "quantization_config" not in kw


def test_a_qlora_round_trip_loads_the_recorded_4bit_format(llama_base: Path, trained_elsewhere: Path) -> None:
    fmt = QLoraFormat(quant_type="fp4", blocksize=64, double_quant=True)
    load = load_plan(_job(llama_base, trained_elsewhere, qlora=fmt))
    assert (load.load_in_4bit, load.quant_type, load.double_quant) == (True, "fp4", True)
    q = load.kwargs()["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "fp4" and q.bnb_4bit_use_double_quant is True
    assert "load_in_16bit" not in load.kwargs()


def test_what_unsloth_cannot_honour_fails_before_loading(llama_base: Path, trained_elsewhere: Path) -> None:
    with pytest.raises(PermanentError) as err:
        load_plan(_job(llama_base, trained_elsewhere, dtype="float32"))
    assert "16-bit" in str(err.value) and "merge.dtype" in str(err.value) and "streaming" in str(err.value)
    with pytest.raises(PermanentError) as err:
        load_plan(_job(llama_base, trained_elsewhere, qlora=QLoraFormat(blocksize=128)))
    assert "blocks of 64" in str(err.value) and "block 128" in str(err.value) and "streaming" in str(err.value)


def test_what_was_loaded_is_read_back_and_must_be_what_was_asked(
    llama_base: Path, trained_elsewhere: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llama_base), dtype=torch.bfloat16)
    facts = loaded_facts(model)
    assert Path(facts["name_or_path"]).resolve() == llama_base.resolve()
    assert facts["dtype"] == "bfloat16" and facts["load_in_4bit"] is False
    check_loaded(load_plan(_job(llama_base, trained_elsewhere)), facts)  # the request, met

    other = tmp_path / "other-base"
    shutil.copytree(llama_base, other)
    with pytest.raises(PermanentError) as err:
        check_loaded(load_plan(_job(other, trained_elsewhere)), facts)
    assert str(other) in str(err.value) and str(llama_base) in str(err.value)
    with pytest.raises(PermanentError, match="dtype bfloat16 instead of float16"):
        check_loaded(load_plan(_job(llama_base, trained_elsewhere, dtype="float16")), facts)
    with pytest.raises(PermanentError, match="not the 4-bit round trip"):
        check_loaded(load_plan(_job(llama_base, trained_elsewhere, qlora=QLoraFormat())), facts)
