"""Training metadata beside the adapter: which files are metadata, and what the card wants from them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tasks.core.hashing import iter_files
from tasks.core.jsonfiles import read_json_or
from tasks.download.vocab import METADATA_FILES

log = logging.getLogger("loraship.download")


def remove_extraneous(dest: Path, keep: set[str]) -> list[str]:
    """Delete files in `dest` that the source no longer has (the artifact must be exactly the source)."""
    removed = []
    for rel in iter_files(dest):
        if rel.as_posix() not in keep:
            (dest / rel).unlink()
            removed.append(rel.as_posix())
    if removed:
        log.info("removed %d file(s) the source no longer has: %s", len(removed), ", ".join(removed[:5]))
    return removed


def metadata_files(dest: Path) -> dict[str, str]:
    return {name: str(dest / name) for name in METADATA_FILES if (dest / name).exists()}


# What the card keeps of each training file (data, not code: add a field here and the card's source has it).
ADAPTER_FIELDS = (
    "peft_type",
    "task_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "base_model_name_or_path",
    "use_dora",
    "use_rslora",
)
TRAINER_STATE_FIELDS = ("global_step", "epoch", "max_steps", "num_train_epochs", "best_metric", "train_batch_size")
TRAINING_ARGS_FIELDS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "warmup_ratio",
    "weight_decay",
    "optim",
    "bf16",
    "fp16",
    "seed",
)
RESULT_FILES = ("all_results.json", "train_results.json", "eval_results.json", "results.json")


def training_summary(folder: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the model card wants to know about the training run (artifact meta `training`).

    Read from adapter_config.json, trainer_state.json, training_args.json and *results.json in `folder`;
    `extra` holds the same files' parsed content found beside the run (e.g. the output root when the run
    folder is a checkpoint). Only small JSON values are kept.
    """
    docs = dict(extra or {})
    for name in METADATA_FILES:
        if name.endswith(".json"):
            doc = read_json_or(folder / name)
            if doc is not None:
                docs[name] = doc
    out = {
        "adapter": _fields(docs.get("adapter_config.json"), ADAPTER_FIELDS),
        "trainer_state": _trainer_state(docs.get("trainer_state.json")),
        "training_args": _fields(docs.get("training_args.json"), TRAINING_ARGS_FIELDS),
        "results": _results(docs),
    }
    return {k: v for k, v in out.items() if v}


def _fields(doc: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: doc[k] for k in keys if k in doc} if isinstance(doc, dict) else {}


def _trainer_state(st: Any) -> dict[str, Any]:
    """The trainer state's set fields, plus the last logged training and evaluation losses."""
    if not isinstance(st, dict):
        return {}
    state = {k: st[k] for k in TRAINER_STATE_FIELDS if st.get(k) is not None}
    logs = st.get("log_history") or []
    train = [e for e in logs if isinstance(e, dict) and "loss" in e]
    evals = [e for e in logs if isinstance(e, dict) and "eval_loss" in e]
    if train:
        state["final_train_loss"] = train[-1]["loss"]
    if evals:
        state["final_eval_loss"] = evals[-1]["eval_loss"]
    return state


def _results(docs: dict[str, Any]) -> dict[str, Any]:
    """The scalar values of the *results.json files (later files win), each shorter than 200 characters."""
    results: dict[str, Any] = {}
    for name in RESULT_FILES:
        doc = docs.get(name)
        if isinstance(doc, dict):
            results.update(
                {k: v for k, v in doc.items() if isinstance(v, (int, float, str, bool)) and len(str(v)) < 200}
            )
    return results
