"""The `peft` merge backend: the reference implementation users know.

PeftModel.from_pretrained + merge_and_unload + save_pretrained as safetensors shards. It holds the whole
model in memory: fine for small models, and what the streaming backend is checked against. It also takes
bases stored as PyTorch `.bin` files, which the streaming backend cannot read.
"""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path
from typing import Any

from tasks.core.progress import Progress
from tasks.merge.backends.base import MergeBackend, MergeJob
from tasks.merge.loading import load_base
from tasks.merge.qlora import QLoraFormat


def peft_merge(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    dtype: str,
    max_shard_size: str,
    qlora: QLoraFormat | None = None,
    untie: bool = False,
) -> dict[str, Any]:
    """merge_and_unload with peft and save_pretrained as safetensors shards (untied first when the plan unties)."""
    from peft import PeftModel

    base = load_base(base_dir, dtype, qlora, untie)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    merged = model.merge_and_unload(safe_merge=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True, max_shard_size=max_shard_size)
    del merged, model, base
    gc.collect()
    return {"shards": len(list(out_dir.glob("*.safetensors")))}


class PeftBackend(MergeBackend):
    name = "peft"
    description = "peft's merge_and_unload on the whole model in memory; also takes .bin bases"
    reads_bin_weights = True

    def unavailable(self) -> str | None:
        missing = [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]
        return f"needs {', '.join(missing)}, not installed" if missing else None

    def run(self, job: MergeJob, out_dir: Path, progress: Progress) -> dict[str, Any]:
        untie = bool(job.plan and job.plan.untied)
        return peft_merge(job.base_dir, job.adapter_dir, out_dir, job.dtype, job.max_shard_size, job.qlora, untie)
