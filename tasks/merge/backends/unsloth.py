"""The `unsloth` merge backend: unsloth's merged 16-bit save, on a CUDA GPU only.

Not verified on a GPU in this project's CI (no GPU here; see issue 19): without CUDA or without the
unsloth package, `unavailable` says so and the stage fails before any work, naming the other backends.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from tasks.core.progress import Progress
from tasks.merge.backends.base import MergeBackend, MergeJob


def unsloth_merge(adapter_dir: Path, out_dir: Path, base_model: str) -> dict[str, Any]:
    """unsloth's merged 16-bit save (GPU only)."""
    from unsloth import FastLanguageModel  # type: ignore[import-not-found]

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(adapter_dir), load_in_4bit=False)
    model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_16bit")
    return {"shards": len(list(out_dir.glob("*.safetensors"))), "unsloth_base": base_model}


class UnslothBackend(MergeBackend):
    name = "unsloth"
    description = "unsloth's merged 16-bit save, CUDA GPU only"

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("torch") is None:
            return "needs torch with CUDA, and torch is not installed"
        import torch

        if not torch.cuda.is_available():
            return "needs a CUDA GPU, and none is available on this machine"
        if importlib.util.find_spec("unsloth") is None:
            return "needs the unsloth package, which is not installed (pip install 'loraship[gpu]')"
        return None

    def run(self, job: MergeJob, out_dir: Path, progress: Progress) -> dict[str, Any]:
        return unsloth_merge(job.adapter_dir, out_dir, job.base_ref)
