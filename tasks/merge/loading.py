"""Loading a whole base model with transformers, as the peft backend and the logits check both need it.

With the QLoRA round trip, the base's linear weights are replaced by their NF4-dequantized values after
loading (what the adapter saw during training), exactly as the streaming backend does tensor by tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.merge.plan import nf4_roundtrip, nf4_roundtrip_applies


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def roundtrip_model(model: Any) -> int:
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

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch_dtype(dtype), low_cpu_mem_usage=True)
    if qlora_roundtrip:
        roundtrip_model(model)
    return model
