"""The contract of a merge backend: a name, an availability check that says why not, and `run`.

The merge stage (tasks/merge/stage.py) does everything around a backend: it resolves the base, checks the
adapter against the base's headers (tasks/merge/plan.py), decides the output dtype and the QLoRA choice,
checks the disk, then hands the backend a `MergeJob` and a temporary folder. The backend writes the merged
weights there (safetensors shards, plus the index when sharded) and returns facts for the artifact's meta.
Copying config and tokenizer files, verifying the logits and renaming the folder into place stay in the
stage, so a backend is only the part that differs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tasks.core.progress import Progress
from tasks.merge.plan import MergePlan
from tasks.merge.qlora import QLoraFormat


@dataclass(frozen=True)
class MergeJob:
    """What the stage decided before any heavy work; a backend reads it and decides nothing of this again."""

    adapter_dir: Path
    base_dir: Path  # the resolved local folder of the base (a Hub snapshot included)
    base_ref: str  # the base as configured (folder or Hub id)
    plan: MergePlan | None  # None only when the base has .bin weights and the backend reads them
    dtype: str  # torch dtype name of the output: bfloat16, float16 or float32
    target_st: str | None  # safetensors dtype every float tensor is cast to; None: keep each tensor's
    qlora: QLoraFormat | None  # merge into base linear weights round-tripped through this 4-bit format
    max_shard_size: str  # for backends that shard with save_pretrained


class MergeBackend(ABC):
    """One way of folding the adapter into the base. Subclass, set the class attributes, implement `run`,
    and add an instance to the table in tasks/merge/backends/__init__.py."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line: when to choose it (settings help, errors listing the alternatives)
    reads_bin_weights: ClassVar[bool] = False  # True: also merges PyTorch .bin bases (no header checks then)

    def unavailable(self) -> str | None:
        """Why this backend cannot run on this machine (a missing package, no GPU), or None when it can.

        Cheap, no side effects: the stage calls it before any work, and the error message is
        `merge.backend: <name> <reason>`, so write the reason to follow the name.
        """
        return None

    @abstractmethod
    def run(self, job: MergeJob, out_dir: Path, progress: Progress) -> dict[str, Any]:
        """Write the merged weights into `out_dir` (empty, temporary); return facts for the artifact's meta."""
