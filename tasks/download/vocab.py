"""The download stage's vocabulary, shared by its settings, its sources and the remote pull.

Its own module (no imports from the stage) so that every module of tasks/download/ can import it at the top.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import PurePosixPath

from tasks.core.vocab import Stage

STAGE = Stage.DOWNLOAD
ADAPTER_MARKER = "adapter_config.json"  # a folder holding it is a run folder (peft's save_pretrained writes it)
METADATA_FILES = (
    "adapter_config.json",
    "trainer_state.json",
    "training_args.json",
    "all_results.json",
    "train_results.json",
    "eval_results.json",
    "results.json",
)  # fmt: skip  JSON only: the card and loraship.json never read a pickle
DEFAULT_EXCLUDE = ["optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "global_step*/*", "*.ckpt"]
# Never fetched, whatever `exclude` says: pickles nothing downstream reads. HF Trainer's training_args.bin
# is a pickle of TrainingArguments and holds `hub_token` when one was set; loading any of them runs code.
# (adapter_model.bin, an old peft adapter format, is still fetched: the merge may need it; it is never
# published, see tasks/publish/allowlist.py.)
NEVER_FETCH = ("training_args.bin", "*.pkl", "*.pickle", "*.joblib")


def wanted(rel: str, include: list[str], exclude: list[str]) -> bool:
    """Is the file at `rel` (relative posix path in the run folder) to be fetched?"""
    p = PurePosixPath(rel)
    if any(p.match(g) for g in NEVER_FETCH):
        return False
    return any(p.match(g) for g in include) and not any(p.match(g) for g in exclude)


BytesHook = Callable[[int], None]
