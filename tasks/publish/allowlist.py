"""What may be published: an allow-list of files per place in the repo, and of fields per artifact kind.

Publishing is an allow-list, never a deny-list: a new file a trainer starts writing (a pickle, a marker,
a log with paths in it) is left out until someone decides it belongs. Pickles (`*.bin`, `*.pt`, `*.pth`,
`*.pkl`, `*.ckpt`) are never on it: loading one runs code, and HF Trainer's `training_args.bin` carries
`hub_token` when one was set.

Each repo kind (hub.repos, tasks/publish/repos.py) has its own layout (`REPO_LAYOUTS`):

- gguf repo root: the GGUFs (or a split GGUF's shard folder), README.md (the card), loraship.json;
  adapter/ (hub.include_adapter): adapter_config.json, the adapter weights as safetensors, tokenizer files;
  merged/ (hub.include_merged): config files, safetensors shards and index, tokenizer and processor files
- merged repo root (`<owner>/<model>`): what transformers loads (the merged/ files above), the card, loraship.json
- adapter repo root (`<owner>/<model>-LoRA`): what peft loads (the adapter/ files above), the card, loraship.json
- training/ in every repo: the training metadata as JSON only (adapter_config, trainer_state, *results.json, ...)

README.md is always our card: the adapter's own README (peft's template) can name the training box's
base folder in its YAML, so it is never published. JSON files are published through `scrub_json_file`:
a value that is a local path (`base_model_name_or_path`, `_name_or_path`, trainer_state's
`best_model_checkpoint`, training_args' `output_dir`) is replaced by the base's Hub id or the path's last
component, so nothing names a folder on the training box or this machine.

`loraship.json` is built from `ARTIFACT_FIELDS`/`META_FIELDS`: digests, sizes, tool versions,
quantization facts and quality numbers, and nothing that belongs to this machine or this particular run
(paths, hosts, host keys, pids, seconds, byte counts, thread counts, timestamps), so that an unchanged
run publishes a byte-identical file.
"""

from __future__ import annotations

import json
import re
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json",
)  # fmt: skip

PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "feature_extractor_config.json",
    "normalizer.json",
    "video_preprocessor_config.json",
)  # fmt: skip  speech and vision models: what AutoProcessor loads beside the tokenizer

# Files per place in the repo, as glob patterns on the path relative to that place. No README.md: the card
# is ours (see the module docstring).
ADAPTER_FILES = ("adapter_config.json", "*.safetensors", *TOKENIZER_FILES, "tokenizer/*")
MERGED_FILES = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES,
    *PROCESSOR_FILES,
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


def repo_file_allowed(path_in_repo: str, kind: str = "gguf") -> bool:
    """Is this path of a staged `kind` repo folder (gguf, merged, adapter) on the allow-list (the check
    before anything is sent)?"""
    parts = path_in_repo.split("/", 1)
    if kind != "gguf":
        root = {"merged": MERGED_FILES, "adapter": ADAPTER_FILES}.get(kind)
        if root is None:
            return False
        if len(parts) == 2 and parts[0] == "training":
            return training_file_allowed(parts[1])
        return path_in_repo in ("README.md", "loraship.json") or _matches(path_in_repo, root)
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


# --- local paths out of published JSON ----------------------------------------------------------------

BASE_PATH_KEYS = ("base_model_name_or_path", "_name_or_path", "name_or_path")  # where configs name the base
_WHOLE_PATH = re.compile(r"^(/|~/|[A-Za-z]:[\\/])[^\n]*$")
MAX_SCRUBBED_JSON = 1 << 20  # configs are a few KB; a big tokenizer.json holds vocabulary (local_path_leaks reads it)
_DROP = object()


def is_local_path(value: Any) -> bool:
    """A string that is a filesystem path as a whole (`/home/u/base`, `~/x`, `C:\\x`), not text that has one."""
    return isinstance(value, str) and bool(_WHOLE_PATH.match(value))


def scrub_local_paths(value: Any, base_hub_id: str = "", key: str = "") -> Any:
    """`value` with every local path replaced: a base-model key by `base_hub_id` (dropped when there is
    none, so peft/transformers do not try to open a folder that exists only on the training box), any
    other path by its last component (`/runs/x/checkpoint-500` -> `checkpoint-500`). `_DROP` marks a
    value to remove."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            cleaned = scrub_local_paths(v, base_hub_id, str(k))
            if cleaned is not _DROP:
                out[k] = cleaned
        return out
    if isinstance(value, list):
        return [v for v in (scrub_local_paths(v, base_hub_id, key) for v in value) if v is not _DROP]
    if not is_local_path(value):
        return value
    if key in BASE_PATH_KEYS:
        return base_hub_id or _DROP
    return PurePosixPath(value.replace("\\", "/").rstrip("/")).name or _DROP


def scrub_json_file(src: Path, dst: Path, base_hub_id: str = "") -> bool:
    """Write `src` to `dst` with local paths scrubbed (`scrub_local_paths`). False (nothing written) when
    the file is not a small JSON object or has no local path: the caller links the original then."""
    if src.suffix != ".json" or src.stat().st_size > MAX_SCRUBBED_JSON:
        return False
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    cleaned = scrub_local_paths(data, base_hub_id)
    if cleaned == data:
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(cleaned, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


# --- the last check: no local path in a staged text file ---------------------------------------------

WEIGHT_SUFFIXES = (".gguf", ".safetensors")  # numbers, not text (their headers go through the secret scan)


def local_path_leaks(folder: Path, paths: list[str]) -> list[tuple[str, str]]:
    """(file, path) for each staged file of `folder` that names one of `paths` (the run folder, a local base,
    the training box's folder): what the scrubbing above did not catch, e.g. a path inside a longer text.
    Weights are skipped; text files are read whole (tokenizer.json included: a few MB)."""
    needles = sorted({p.rstrip("/") for p in paths if p and len(p.rstrip("/")) > 4}, key=len, reverse=True)
    hits: list[tuple[str, str]] = []
    if not needles:
        return hits
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or f.suffix in WEIGHT_SUFFIXES:
            continue
        text = f.read_bytes().decode("utf-8", errors="replace")
        found = next((n for n in needles if n in text), None)
        if found is not None:
            hits.append((f.relative_to(folder).as_posix(), found))
    return hits


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
