"""The merge backends that load whole models (peft, unsloth) and the logits check of a merged model.

`peft`: the reference implementation users know (PeftModel.from_pretrained + merge_and_unload +
save_pretrained). It holds the whole model in memory: fine for small models, and what the streaming
backend is checked against. `unsloth`: its own merged-16-bit save, GPU only. Verification runs the
merged model and PeftModel(base, adapter) on one fixed prompt and reports the largest logit difference.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from tasks.core.errors import PermanentError
from tasks.merge.plan import nf4_roundtrip, nf4_roundtrip_applies

log = logging.getLogger("loraship.merge")

VERIFY_PROMPT = (
    "The quick brown fox jumps over the lazy dog. Once upon a time there was a small model that learned to count: 1 2 3"
)


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def _roundtrip_model(model: Any) -> int:
    """Apply the NF4 round trip to a loaded model's linear weights (as the streaming backend does)."""
    import torch

    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if nf4_roundtrip_applies(name, tuple(p.shape)):
                p.copy_(nf4_roundtrip(p.data))
                n += 1
    return n


def load_base(base_dir: Path, dtype: str, qlora_roundtrip: bool) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=_torch_dtype(dtype), low_cpu_mem_usage=True)
    if qlora_roundtrip:
        _roundtrip_model(model)
    return model


def peft_merge(
    base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str, max_shard_size: str, qlora_roundtrip: bool = False
) -> dict[str, Any]:
    """merge_and_unload with peft and save_pretrained as safetensors shards."""
    from peft import PeftModel

    base = load_base(base_dir, dtype, qlora_roundtrip)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    merged = model.merge_and_unload(safe_merge=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True, max_shard_size=max_shard_size)
    del merged, model, base
    gc.collect()
    return {"shards": len(list(out_dir.glob("*.safetensors")))}


def unsloth_merge(adapter_dir: Path, out_dir: Path, base_model: str) -> dict[str, Any]:
    """unsloth's merged 16-bit save (GPU only). Not verified on a GPU in this project's CI."""
    import torch

    if not torch.cuda.is_available():
        raise PermanentError(
            "merge.backend: unsloth needs a CUDA GPU, and none is available on this machine",
            hint="use merge.backend: streaming (the default: low memory, no GPU) or merge.backend: peft",
        )
    try:
        from unsloth import FastLanguageModel  # type: ignore[import-not-found]
    except ImportError:
        raise PermanentError(
            "merge.backend: unsloth is selected but the unsloth package is not installed",
            hint="pip install 'loraship[gpu]', or use merge.backend: streaming or peft",
        ) from None
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(adapter_dir), load_in_4bit=False)
    model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_16bit")
    return {"shards": len(list(out_dir.glob("*.safetensors"))), "unsloth_base": base_model}


def _logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def verify_logits(
    base_dir: Path, adapter_dir: Path, merged_dir: Path, qlora_roundtrip: bool = False, prompt: str = VERIFY_PROMPT
) -> dict[str, Any]:
    """Largest |logit| difference between the merged model and PeftModel(base, adapter), in float32.

    Also reports how much the adapter changes the base's logits, so the merge error can be read
    against the size of the effect it must preserve.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    ids = tok(prompt, return_tensors="pt")["input_ids"][:, :64]
    base = load_base(base_dir, "float32", qlora_roundtrip)
    ref_model = PeftModel.from_pretrained(base, str(adapter_dir))
    ref_model.eval()
    ref = _logits(ref_model, ids)
    with ref_model.disable_adapter():
        plain = _logits(ref_model, ids)
    del ref_model, base
    gc.collect()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    merged.eval()
    got = _logits(merged, ids)
    del merged
    gc.collect()
    diff = float((got - ref).abs().max())
    return {
        "max_abs_logit_diff": diff,
        "reference_max_abs_logit": float(ref.abs().max()),
        "adapter_effect_max_abs_logit": float((ref - plain).abs().max()),
        "verify_prompt_tokens": int(ids.shape[1]),
    }
