"""Stage 2, merge: fold the LoRA adapter into the base model's weights (streaming, peft or unsloth).

The order of work: resolve the base model (a folder, or a Hub id through huggingface_hub's cache), read
the adapter and the base's safetensors headers and check they fit (tasks/merge/plan.py) before any
heavy work, check the disk, then merge into a temporary folder beside merged/ with the chosen backend
(tasks/merge/streaming.py: one tensor at a time; tasks/merge/torch_backends.py: peft, unsloth), copy the
config, tokenizer, generation config and chat template, verify the merged model's logits against
PeftModel(base, adapter) on a fixed prompt, and only then rename the folder to merged/. A failure at
any step leaves no merged/ (or the previous one) behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_dir
from tasks.core.errors import PermanentError
from tasks.core.progress import Progress
from tasks.core.settings import StrictModel
from tasks.core.stage import stage_task
from tasks.merge.plan import (
    MergePlan,
    base_is_quantized,
    build_plan,
    detect_qlora,
    disk_preflight,
    load_adapter,
    read_json,
    same_base,
)
from tasks.merge.safetensors_io import DTYPES, TORCH_TO_ST

STAGE = "merge"
log = logging.getLogger("loraship.merge")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".lock")
SKIP_FILES = {
    "README.md",
    ".gitattributes",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    ".complete",
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class MergeSettings(StrictModel):
    """How the adapter is folded into the base model."""

    backend: Literal["streaming", "peft", "unsloth"] = Field(
        "streaming",
        description=(
            "streaming: tensor by tensor, low memory, no GPU (default); peft: merge_and_unload on the whole "
            "model; unsloth: GPU only"
        ),
    )
    base_model: str = Field(
        "",
        description=(
            "local folder or Hub id of the base model; empty: model.base_model, else the adapter's "
            "base_model_name_or_path"
        ),
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype of the merged weights; auto: the base's"
    )
    strict_base: bool = Field(
        False,
        description=(
            "fail (instead of warning) when the adapter's base_model_name_or_path differs from the configured base"
        ),
    )
    verify: Literal["auto", "always", "never"] = Field(
        "auto",
        description=(
            "compare the merged model's logits with PeftModel(base, adapter) on a fixed prompt; auto: when the "
            "base is at most verify_max_gb"
        ),
    )
    verify_max_gb: float = Field(
        2.0,
        ge=0,
        description="size limit (GB of base weights) for verify: auto; verification loads the model twice in float32",
    )
    verify_tolerance: float = Field(
        0.02, gt=0, description="fail when max |logit difference| exceeds this fraction of the largest reference logit"
    )
    qlora: Literal["auto", "roundtrip", "original"] = Field(
        "auto",
        description=(
            "for adapters trained on a 4-bit base: roundtrip merges into NF4-dequantized base weights (what the "
            "adapter saw); original merges into the 16-bit weights; auto: roundtrip when QLoRA is detected"
        ),
    )
    max_shard_size: str = Field(
        "5GB", description="shard size for the peft backend's save_pretrained (streaming keeps the base's shards)"
    )


# --- the base model -------------------------------------------------------------------------------------


def base_reference(settings: MergeSettings, default_base: str, adapter_cfg: dict[str, Any]) -> str:
    ref = settings.base_model or default_base or str(adapter_cfg.get("base_model_name_or_path") or "")
    if not ref:
        raise PermanentError(
            "no base model: merge.base_model, model.base_model and the adapter's base_model_name_or_path are all empty",
            hint="set merge.base_model to the base model's folder or Hub id",
        )
    return ref


def resolve_base(ref: str, download: bool = True) -> Path | None:
    """A local folder for `ref`: the folder itself, or the Hub snapshot (from the cache first)."""
    p = Path(ref).expanduser()
    if p.is_dir():
        return p.resolve()
    if not _HUB_ID.match(ref) or ref.startswith((".", "/", "~")):
        raise PermanentError(
            f"base model {ref!r} is not a folder",
            hint="set merge.base_model (or model.base_model) to the base model's folder or Hub id",
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]
    try:
        return Path(snapshot_download(ref, local_files_only=True, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        if not download:
            return None
    log.info("base model %s is not in the Hugging Face cache: downloading it", ref)
    return Path(snapshot_download(ref, allow_patterns=patterns))


def base_fingerprint(settings: MergeSettings, default_base: str, adapter: Artifact) -> str:
    """A cheap key for the base model's content (file names, sizes, mtimes), for the cache key.

    Hashing a many-GB base on every run would cost more than the merge; a changed file changes its
    size or mtime.
    """
    cfg_path = adapter.local_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    ref = base_reference(settings, default_base, cfg)
    folder = resolve_base(ref, download=False)
    if folder is None:
        return f"hub:{ref}"
    stats = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file())
    return hashlib.sha256(json.dumps([str(folder), stats]).encode()).hexdigest()


# --- helpers ----------------------------------------------------------------------------------------------


def _base_dtype(plan: MergePlan | None, base_config: dict[str, Any]) -> str:
    if plan is not None:
        counts = Counter(t.dtype for t in plan.base_tensors.values() if t.dtype in TORCH_TO_ST.values())
        if counts:
            return DTYPES[counts.most_common(1)[0][0]][0]
    name = str(base_config.get("dtype") or base_config.get("torch_dtype") or "float32")
    return name if name in TORCH_TO_ST else "float32"


def copy_side_files(base_dir: Path, adapter_dir: Path, out: Path, dtype: str | None) -> str:
    """Config, generation config, tokenizer and chat template next to the weights. Returns where the
    tokenizer came from: the adapter folder when training saved one there (it may carry the chat
    template the model was trained with), else the base."""
    for f in sorted(base_dir.iterdir()):
        if (
            f.is_file()
            and f.name not in SKIP_FILES
            and not f.name.startswith(".")
            and not f.name.endswith(WEIGHT_SUFFIXES)
            and not (out / f.name).exists()
        ):
            shutil.copyfile(f, out / f.name)
    tokenizer_from = "base"
    if (adapter_dir / "tokenizer_config.json").exists():
        for name in TOKENIZER_FILES:
            if (adapter_dir / name).is_file():
                shutil.copyfile(adapter_dir / name, out / name)
        tokenizer_from = "adapter"
        log.info("using the tokenizer and chat template saved with the adapter")
    if dtype is not None and (out / "config.json").exists():
        cfg = json.loads((out / "config.json").read_text())
        cfg["dtype"] = dtype
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = dtype
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return tokenizer_from


def _dir_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


# --- the stage ------------------------------------------------------------------------------------------------


def merge(
    adapter: Artifact, settings: MergeSettings, out_dir: Path, default_base: str = "", base_key: str = ""
) -> Artifact:
    """Merge `adapter` into its base model; write merged/ atomically; return the 'merged' artifact."""
    started = time.monotonic()
    adapter_dir = adapter.local_path
    if settings.backend == "unsloth":
        import torch

        if not torch.cuda.is_available():  # fail before any work
            raise PermanentError(
                "merge.backend: unsloth needs a CUDA GPU, and none is available on this machine",
                hint="use merge.backend: streaming (the default: low memory, no GPU) or merge.backend: peft",
            )
    adapter_cfg, tensors = load_adapter(adapter_dir)
    ref = base_reference(settings, default_base, adapter_cfg)
    base_dir = resolve_base(ref)
    assert base_dir is not None
    base_config = read_json(base_dir / "config.json")
    quantized = base_is_quantized(base_config)
    if quantized:
        raise PermanentError(
            f"the base model {ref} is stored quantized ({quantized}); merging needs its 16-bit weights",
            hint="point merge.base_model at the original (unquantized) base model",
        )

    adapter_base = str(adapter_cfg.get("base_model_name_or_path") or "")
    if not same_base(adapter_base, ref, base_dir):
        msg = f"the adapter was trained on {adapter_base!r} but the configured base is {ref!r}"
        if settings.strict_base:
            raise PermanentError(
                msg, hint="set merge.base_model to the adapter's base, or merge.strict_base: false to merge anyway"
            )
        log.warning("%s; merging anyway (shapes are checked; set merge.strict_base: true to refuse)", msg)

    qlora_reason = detect_qlora(adapter_dir, adapter_cfg)
    roundtrip = settings.qlora == "roundtrip" or (settings.qlora == "auto" and qlora_reason is not None)
    if qlora_reason:
        log.info(
            "QLoRA adapter detected (%s): merging into %s",
            qlora_reason,
            "NF4-dequantized base weights (merge.qlora: roundtrip)"
            if roundtrip
            else "the original 16-bit base weights (merge.qlora: original)",
        )
    elif roundtrip:
        log.info("merge.qlora: roundtrip: merging into NF4-dequantized base weights")

    plan: MergePlan | None = None
    try:
        plan = build_plan(base_dir, base_config, adapter_cfg, tensors)
    except PermanentError as exc:
        if settings.backend == "peft" and "PyTorch .bin weights" in str(exc):
            log.info("base has .bin weights: the peft backend loads them; the tensor-level checks are skipped")
        else:
            raise
    if plan is not None:
        for note in plan.notes:
            log.warning(note)

    base_dtype = _base_dtype(plan, base_config)
    out_dtype_name = base_dtype if settings.dtype == "auto" else settings.dtype
    target_st = None if settings.dtype == "auto" else TORCH_TO_ST[settings.dtype]
    base_bytes = plan.base_bytes() if plan is not None else sum(f.stat().st_size for f in base_dir.glob("*.bin"))
    from tasks.merge.streaming import output_bytes

    needed = (output_bytes(plan, target_st) if plan is not None else base_bytes) + _dir_size(base_dir) - base_bytes
    disk_preflight(out_dir.parent, max(needed, 0))

    do_verify = settings.verify == "always" or (
        settings.verify == "auto" and base_bytes <= settings.verify_max_gb * 1e9
    )
    meta: dict[str, Any] = {
        "backend": settings.backend,
        "base_model": ref,
        "base_dir": str(base_dir),
        "adapter_base_model": adapter_base,
        "dtype": out_dtype_name,
        "r": adapter_cfg.get("r"),
        "lora_alpha": adapter_cfg.get("lora_alpha"),
        "use_rslora": bool(adapter_cfg.get("use_rslora")),
        "use_dora": bool(adapter_cfg.get("use_dora")),
        "fan_in_fan_out": bool(adapter_cfg.get("fan_in_fan_out")),
        "modules_to_save": adapter_cfg.get("modules_to_save") or [],
        "tied_embeddings": bool(plan and plan.tied_to),
        "qlora_detected": qlora_reason,
        "qlora_base": "nf4-roundtrip" if roundtrip else "original",
    }
    if plan is not None:
        meta["scalings"] = sorted({round(op.scaling, 6) for ops in plan.ops.values() for op in ops})
    with atomic_dir(out_dir) as tmp:
        with Progress(f"merge ({settings.backend})", max(base_bytes, 1)) as progress:
            if settings.backend == "streaming":
                from tasks.merge.streaming import stream_merge

                assert plan is not None
                meta.update(stream_merge(plan, tmp, target_st, roundtrip, progress))
            elif settings.backend == "peft":
                from tasks.merge.torch_backends import peft_merge

                meta.update(peft_merge(base_dir, adapter_dir, tmp, out_dtype_name, settings.max_shard_size, roundtrip))
            else:
                from tasks.merge.torch_backends import unsloth_merge

                meta.update(unsloth_merge(adapter_dir, tmp, ref))
        meta["tokenizer_from"] = copy_side_files(
            base_dir, adapter_dir, tmp, None if settings.dtype == "auto" else out_dtype_name
        )
        meta["merge_seconds"] = round(time.monotonic() - started, 3)
        if do_verify:
            from tasks.merge.torch_backends import verify_logits

            result = verify_logits(base_dir, adapter_dir, tmp, roundtrip)
            meta.update(result)
            problem = verification_problem(result, settings.verify_tolerance)
            meta["verify_passed"] = problem is None
            if problem:
                raise PermanentError(
                    f"{problem}; merged/ was not written",
                    hint=(
                        "try merge.backend: peft and report the adapter; or raise merge.verify_tolerance if a "
                        "lower merge.dtype explains it"
                    ),
                )
        else:
            meta["max_abs_logit_diff"] = None
            meta["verify_skipped"] = (
                f"base weights {base_bytes / 1e9:.2f} GB > merge.verify_max_gb {settings.verify_max_gb}"
                if settings.verify == "auto"
                else "merge.verify: never"
            )
    meta["seconds"] = round(time.monotonic() - started, 3)
    inputs = {adapter.name: adapter.sha256, "base": base_key or ref}
    return Artifact.from_path(
        out_dir,
        name="merged",
        kind="merged",
        stage=STAGE,
        inputs=inputs,
        settings=settings,
        tools=["torch", "safetensors", "transformers", "peft"],
        meta=meta,
    )


def verification_problem(result: dict[str, Any], tolerance: float) -> str | None:
    """Judge the logit check: None when the merged model reproduces PeftModel(base, adapter).

    Rounding the merged weights to a 16-bit dtype moves logits too, and on deep models the move can
    exceed a fixed fraction of the logits while the merge is right. A wrong merge (adapter missing,
    wrong scale, transposed) leaves the merged model about as far from the reference as the adapter's
    own effect. So the check fails only when the difference is above the tolerance AND above a quarter
    of the adapter's effect; a difference above the tolerance alone is logged as rounding noise.
    """
    diff = result["max_abs_logit_diff"]
    limit = tolerance * max(result["reference_max_abs_logit"], 1.0)
    effect = result["adapter_effect_max_abs_logit"]
    log.info(
        (
            "verification: max |logit difference| %.3g against PeftModel(base, adapter) (limit %.3g; the adapter "
            "changes logits by up to %.3g)"
        ),
        diff,
        limit,
        effect,
    )
    if not diff == diff:  # NaN
        return "the merged model's logits are NaN"
    if diff <= limit:
        return None
    if diff < 0.25 * effect:
        log.warning(
            (
                "logit difference %.3g is above merge.verify_tolerance (%.3g) but small against the adapter's "
                "effect (%.3g): dtype rounding, not a wrong merge"
            ),
            diff,
            limit,
            effect,
        )
        return None
    return (
        f"the merged model's logits differ from PeftModel(base, adapter) by {diff:.4g} "
        f"(limit {limit:.4g}; the adapter itself changes them by {effect:.4g})"
    )


@stage_task(STAGE)
def merge_task(
    adapter: Artifact, settings: MergeSettings, out_dir: Path, default_base: str = "", base_key: str = ""
) -> Artifact:
    """The cache key covers the whole merge package (tasks/core/caching.py); base_key stands for the base."""
    return merge(adapter, settings, out_dir, default_base, base_key)
