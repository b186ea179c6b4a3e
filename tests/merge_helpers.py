"""Adapter and model variants for the merge tests, built with the real transformers/peft on tiny configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tasks.core.artifacts import Artifact


def as_artifact(adapter_dir: Path) -> Artifact:
    return Artifact.from_path(adapter_dir, name="adapter", kind="adapter", stage="download")


def load_weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def peft_adapter(base: Path, out: Path, seed: int = 3, **lora: Any) -> Path:
    """A LoRA adapter made with peft for `base` with non-zero B (and magnitudes perturbed for DoRA)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(lora_dropout=0.0, **lora))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0.0, 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.1 * torch.randn_like(p))
    pm.save_pretrained(str(out), safe_serialization=True)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def tiny_gpt2(out: Path) -> Path:
    """A GPT-2 style model: Conv1D layers (fan_in_fan_out) and tied embeddings.

    The tokenizer is trained on the llama fixture's corpus.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tasks.support.tiny_models import train_bpe_tokenizer

    tok = train_bpe_tokenizer(out)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128, tie_word_embeddings=True)
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".complete"))
    return dst


def bf16_ulp(x: Any) -> Any:
    """The spacing of bfloat16 numbers at |x| (8 significant bits)."""
    import torch

    m = x.abs().float().clamp_min(2.0**-126)
    return torch.exp2(torch.floor(torch.log2(m)) - 7)
