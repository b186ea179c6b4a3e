"""What may be published: an allow-list of files per place in the repo, and of fields per artifact kind.

Publishing is an allow-list, never a deny-list: a new file a trainer starts writing (a pickle, a marker,
a log with paths in it) is left out until someone decides it belongs. Pickles (`*.bin`, `*.pt`, `*.pth`,
`*.pkl`, `*.ckpt`) are never on it: loading one runs code, and HF Trainer's `training_args.bin` carries
`hub_token` when one was set.

- repo root: the GGUFs (or a split GGUF's shard folder), README.md (the card), loraship.json
- training/: the training metadata as JSON only (adapter_config, trainer_state, *results.json, ...)
- adapter/: adapter_config.json, the adapter weights as safetensors, tokenizer files, the adapter's README
- merged/ (hub.include_merged): config files, safetensors shards and index, tokenizer files

`loraship.json` is built from `ARTIFACT_FIELDS`/`META_FIELDS`: digests, sizes, tool versions,
quantization facts and quality numbers, and nothing that belongs to this machine or this particular run
(paths, hosts, host keys, pids, seconds, byte counts, thread counts, timestamps), so that an unchanged
run publishes a byte-identical file.
"""

from __future__ import annotations

import re
from fnmatch import fnmatch
from pathlib import PurePosixPath
from typing import Any

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json",
)  # fmt: skip

# Files per place in the repo, as glob patterns on the path relative to that place.
ADAPTER_FILES = ("adapter_config.json", "*.safetensors", "README.md", *TOKENIZER_FILES, "tokenizer/*")
MERGED_FILES = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", "README.md",
    *TOKENIZER_FILES,
)  # fmt: skip
TRAINING_FILES = ("*.json",)


def _matches(rel: str, patterns: tuple[str, ...]) -> bool:
    name = PurePosixPath(rel)
    if name.suffix.lower() in PICKLE_SUFFIXES or any(part.startswith(".") for part in name.parts):
        return False  # pickles and hidden files (markers such as .complete) never, whatever the pattern
    return any(fnmatch(rel, p) for p in patterns)


def adapter_file_allowed(rel: str) -> bool:
    return _matches(rel, ADAPTER_FILES)


def merged_file_allowed(rel: str) -> bool:
    return _matches(rel, MERGED_FILES)


def training_file_allowed(name: str) -> bool:
    return "/" not in name and _matches(name, TRAINING_FILES)


def repo_file_allowed(path_in_repo: str) -> bool:
    """Is this path of a staged repo folder on the allow-list (the check before anything is sent)?"""
    parts = path_in_repo.split("/", 1)
    if len(parts) == 1:
        return _matches(path_in_repo, ("*.gguf", "README.md", "loraship.json"))
    top, rest = parts
    if top == "adapter":
        return adapter_file_allowed(rest)
    if top == "merged":
        return merged_file_allowed(rest)
    if top == "training":
        return training_file_allowed(rest)
    return "/" not in rest and _matches(rest, ("*.gguf",))  # a split GGUF's shard folder


# --- loraship.json: fields per artifact kind -------------------------------------------------------

ARTIFACT_FIELDS = ("kind", "sha256", "size", "stage", "inputs", "settings_digest", "tools")
META_FIELDS: dict[str, tuple[str, ...]] = {
    "gguf": (
        "quant", "outtype", "architecture", "tensor_count", "tensor_types", "n_params", "bits_per_weight",
        "size_vs_source", "llama_cpp_commit", "imatrix", "has_chat_template", "tokenizer_model", "tokenizer_pre",
        "vocab_pre_used",
    ),
    "gguf-split": ("quant", "first_shard", "shards", "split_count", "split_max_size", "unsplit", "llama_cpp_commit"),
    "adapter": ("training",),
    "merged": (
        "backend", "dtype", "r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "modules_to_save",
        "tied_embeddings", "qlora_base", "tokenizer_from", "max_abs_logit_diff", "adapter_effect_max_abs_logit",
        "verify_passed", "scalings",
    ),
    "report": ("quants",),
}  # fmt: skip
QUALITY_METRICS = ("ppl", "ppl_delta", "kl_div", "top1_agreement", "accuracy", "size_mb")  # not timings or memory
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_LOCAL_LOOKING = re.compile(r"(^|[\s'\"=(])(/|~/|[A-Za-z]:\\)")


def is_hub_id(value: Any) -> bool:
    """`owner/name` that is not also a local path."""
    return isinstance(value, str) and bool(_HUB_ID.match(value)) and not value.startswith((".", "~"))


def _clean(value: Any) -> Any:
    """JSON values without anything that looks like a local path (a string value with one is dropped)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in sorted(value.items()) if not _looks_local(v)}
    if isinstance(value, list):
        return [_clean(v) for v in value if not _looks_local(v)]
    return value


def _looks_local(value: Any) -> bool:
    return isinstance(value, str) and bool(_LOCAL_LOOKING.search(value))


def _training(training: dict[str, Any]) -> dict[str, Any]:
    out = _clean(training)
    base = (training.get("adapter") or {}).get("base_model_name_or_path")
    if base is not None and not is_hub_id(base):  # the training box's local folder: not ours to publish
        out.get("adapter", {}).pop("base_model_name_or_path", None)
    return out


def published_meta(kind: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The allowed part of an artifact's meta for loraship.json."""
    out: dict[str, Any] = {}
    for key in META_FIELDS.get(kind, ()):
        if key not in meta:
            continue
        value = meta[key]
        if key == "training":
            value = _training(value or {})
        elif key == "quants":
            value = {
                q: {m: v for m, v in sorted((row or {}).items()) if m in QUALITY_METRICS}
                for q, row in sorted((value or {}).items())
            }
        elif key == "shards":
            value = [{k: s.get(k) for k in ("file", "size", "tensors") if k in s} for s in value or []]
        out[key] = _clean(value)
    return out


def artifact_entry(artifact: Any, files: dict[str, str] | None) -> dict[str, Any]:
    """One artifact in loraship.json: the allowed record fields, the allowed meta, its published files."""
    entry = {k: getattr(artifact, k) for k in ARTIFACT_FIELDS}
    entry["tools"] = dict(sorted(entry["tools"].items()))
    entry["inputs"] = dict(sorted(entry["inputs"].items()))
    if files is not None:
        entry["files"] = dict(sorted(files.items()))
    entry["meta"] = published_meta(artifact.kind, artifact.meta)
    return entry
