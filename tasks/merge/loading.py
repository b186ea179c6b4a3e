"""Loading a whole base model with transformers, as the peft backend and the logits check both need it.

With the QLoRA round trip, the base's linear weights are replaced by their dequantize(quantize_4bit(W)) values
after loading (what the adapter saw during training), exactly as the streaming backend does tensor by tensor.
A base whose lm_head is tied to its embedding is untied on request (`untie_head`), so that a LoRA on one of
them does not change the other (tasks/merge/plan.py explains why the merge unties).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.merge import qlora as q4


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def roundtrip_model(model: Any, fmt: q4.QLoraFormat) -> int:
    """Apply the 4-bit round trip to a loaded model's linear weights (as the streaming backend does)."""
    import torch

    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if q4.applies(name, tuple(p.shape)):
                p.copy_(q4.roundtrip(p.data, fmt).to(p.dtype))
                n += 1
    return n


def untie_head(model: Any) -> bool:
    """Give a tied lm_head a parameter of its own (same values); True when it was tied."""
    import torch

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None or head.weight is not emb.weight:
        return False
    head.weight = torch.nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", None)
    if text_config is not None:
        text_config().tie_word_embeddings = False
    return True


def load_base(base_dir: Path, dtype: str, qlora: q4.QLoraFormat | None, untie: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch_dtype(dtype), low_cpu_mem_usage=True)
    if qlora is not None:
        roundtrip_model(model, qlora)
    if untie:
        untie_head(model)
    return model
