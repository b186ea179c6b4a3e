"""Load a model for a task (step 3) and wrap it in a transformers pipeline (step 4).

Device and dtype: `auto` is CUDA when torch sees one, with bfloat16 where the GPU supports it and float16
otherwise, and float32 on CPU (half precision on CPU is slow and some kernels lack it). The model is put
in eval mode; the Auto class comes from the task row (the first one whose mapping knows the config, so a
CTC model and Whisper both load for speech recognition).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tasks.core.errors import PermanentError
from tasks.model_api.inputs import InputKind
from tasks.model_api.settings import Device, DType
from tasks.model_api.tasks_table import ModelFacts, TaskSpec

log = logging.getLogger("loraship.model_api")


def resolve_device(device: Device) -> str:
    import torch

    if device is Device.CUDA and not torch.cuda.is_available():
        raise PermanentError("device: cuda was asked for, but torch sees no CUDA device", hint="use --device auto|cpu")
    if device is Device.AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.value


def resolve_dtype(dtype: DType, device: str) -> str:
    import torch

    if dtype is not DType.AUTO:
        return dtype.value
    if device == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


@dataclass
class Loaded:
    pipe: Any
    model: Any
    device: str
    dtype: str
    parameters: int
    memory_bytes: int
    facts: ModelFacts


def load_model(spec: TaskSpec, path: str, device: str, dtype: str) -> Any:
    """Step 3: the weights on the device in the dtype, eval mode."""
    import torch
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    classes = [getattr(transformers, name) for name in spec.auto_classes]
    cls = next((c for c in classes if type(config) in c._model_mapping), None)
    if cls is None:
        raise PermanentError(
            f"{path}: a {config.model_type} model cannot serve {spec.name} (none of {', '.join(spec.auto_classes)} "
            f"knows {type(config).__name__})",
            hint="pass the --task this model is made for",
        )
    model = cls.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def build_pipeline(spec: TaskSpec, model: Any, path: str, device: str, max_input_tokens: int = 512) -> Any:
    """Step 4: the task's pipeline around the loaded model, its tokenizer/processors loaded from `path`."""
    from transformers import AutoTokenizer, pipeline

    if spec.own_pipeline is not None:
        return spec.own_pipeline(model, AutoTokenizer.from_pretrained(path), max_input_tokens)
    pipe = pipeline(
        spec.name, model=model, tokenizer=_maybe(path, "tokenizer"), device=device, **_processors(spec, path)
    )
    tok = getattr(pipe, "tokenizer", None)
    if tok is not None and spec.name == "text-generation":
        tok.padding_side = "left"  # decoder-only batches pad on the left, so every prompt ends where generation starts
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        if getattr(model.generation_config, "pad_token_id", None) is None:
            model.generation_config.pad_token_id = tok.pad_token_id
    return pipe


def _maybe(path: str, what: str) -> Any:
    """Load the tokenizer only where the folder has one (image models have none)."""
    from pathlib import Path

    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")
    return path if any((Path(path) / n).exists() for n in names) else None


def _processors(spec: TaskSpec, path: str) -> dict[str, Any]:
    """The image processor or feature extractor, loaded explicitly: transformers 5 nests a processor's
    feature extractor in processor_config.json, where the pipeline does not look for it."""
    if spec.input is InputKind.IMAGE:
        from transformers import AutoImageProcessor

        return {"image_processor": AutoImageProcessor.from_pretrained(path)}
    if spec.input is InputKind.AUDIO:
        from transformers import AutoFeatureExtractor

        return {"feature_extractor": AutoFeatureExtractor.from_pretrained(path)}
    return {}


def load(
    spec: TaskSpec, path: str, device: Device, dtype: DType, progress: Any = None, max_input_tokens: int = 512
) -> Loaded:
    """Steps 3 and 4; `progress(percent, step)` hears when the weights are in and when the pipeline is."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model = load_model(spec, path, dev, dt)
    if progress:
        progress(60.0, "pipeline")
    pipe = build_pipeline(spec, model, path, dev, max_input_tokens)
    tok = getattr(pipe, "tokenizer", None)
    fe = getattr(pipe, "feature_extractor", None)
    facts = ModelFacts(
        mask_token=getattr(tok, "mask_token", None) if tok is not None else None,
        sampling_rate=int(getattr(fe, "sampling_rate", 16000) or 16000),
    )
    n_params = sum(p.numel() for p in model.parameters())
    memory = int(model.get_memory_footprint()) if hasattr(model, "get_memory_footprint") else 0
    return Loaded(pipe, model, dev, dt, n_params, memory, facts)
