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

# OpenSSH's own ciphers with AES-GCM first, for rsync's ssh when this CPU has AES instructions: OpenSSH's default
# puts chacha20-poly1305 first, which costs both ends more CPU than AES-GCM on such CPUs (128 MB over loopback:
# 0.65 s against 0.86 s, see the README); every name is in OpenSSH since 6.5, so the server picks its best.
AES_FIRST_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)
