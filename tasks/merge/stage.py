"""Stage 2, merge: fold the LoRA adapter into the base model's weights (streaming, peft or unsloth).

The order of work: resolve the base model (a folder, or a Hub id through huggingface_hub's cache), read
the adapter and the base's safetensors headers and check they fit (tasks/merge/plan.py) before any
heavy work, check the disk, then merge into a temporary folder beside merged/ with the chosen backend
(the table in tasks/merge/backends/: streaming, peft, unsloth), copy the config, tokenizer, generation
config and chat template, check sampled rows of every merged tensor against W + s·B·A recomputed from the
files (tasks/merge/tensor_check.py, any size), verify the merged model's logits against PeftModel(base,
adapter) on several prompts within the measured rounding allowance (tasks/merge/verify.py), and only then
rename the folder to merged/. A failure at any step leaves no merged/ (or the previous one) behind.
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

from pydantic import Field, field_validator, model_validator

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_dir
from tasks.core.disk import disk_preflight
from tasks.core.errors import PermanentError
from tasks.core.progress import Progress
from tasks.core.settings import StrictModel
from tasks.core.stage import stage_task
from tasks.core.vocab import ArtifactKind, Stage
from tasks.merge import qlora as q4
from tasks.merge.backends import DEFAULT_BACKEND, MERGE_BACKENDS, MergeBackend, MergeJob
from tasks.merge.fused import SharedRead
from tasks.merge.plan import (
    MergePlan,
    base_is_quantized,
    build_plan,
    load_adapter,
    output_bytes,
    read_json,
    same_base,
)
from tasks.merge.qlora import QLoraFormat
from tasks.merge.safetensors_io import DTYPES, TORCH_TO_ST
from tasks.merge.tensor_check import check_merged_folder
from tasks.merge.verify import verification_problem

STAGE = Stage.MERGE
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

    backend: str = Field(
        DEFAULT_BACKEND,
        description="; ".join(f"{b.name}: {b.description}" for b in MERGE_BACKENDS.values()),
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
            "auto: after every merge, recompute sampled rows of every merged tensor from the base and adapter files "
            "(any size), and compare the logits with PeftModel(base, adapter) when the base is at most "
            "verify_max_gb; always: both whatever the size; never: neither"
        ),
    )
    verify_max_gb: float = Field(
        2.0,
        ge=0,
        description="size limit (GB of base weights) for the logit check; it loads the model twice in float32",
    )
    verify_tolerance: float = Field(
        0.001,
        gt=0,
        description=(
            "the logit check fails above 2 x the measured rounding allowance of the output dtype + this fraction of "
            "the largest reference logit (float32 arithmetic)"
        ),
    )
    verify_rows: int = Field(8, ge=1, description="rows per tensor the per-tensor check recomputes (plus first/last)")
    qlora: Literal["auto", "roundtrip", "original"] = Field(
        "auto",
        description=(
            "for adapters trained on a 4-bit base: roundtrip merges into the 4-bit round-tripped base weights (what "
            "the adapter saw, in the format its training recorded: nf4/fp4, block size, double quant); original "
            "merges into the 16-bit weights; auto: roundtrip when the training records say 4-bit, a warning when "
            "only the base's name does"
        ),
    )
    qlora_format: QLoraFormat | None = Field(
        None,
        description=(
            "the 4-bit format the adapter trained on, when its records do not say: {quant_type: nf4|fp4, blocksize, "
            "double_quant}"
        ),
    )
    max_shard_size: str = Field(
        "5GB", description="shard size for the peft backend's save_pretrained (streaming keeps the base's shards)"
    )
    fused_convert: bool = Field(
        False,
        description=(
            "merge while converting: llama.cpp's converter reads the base through a source that applies the adapter "
            "tensor by tensor (the streaming merge's math and checks), so the F16/BF16 GGUF is written in one pass and "
            "merged/ holds no weights; when a later stage needs merged/'s weights (hub.include_merged, a merged repo, "
            "the transformers engine or Space) the merge stage's one converter run writes both merged/ and the GGUF "
            "from a single read of the base, and the convert stage reuses that GGUF. Needs the streaming backend and "
            "a safetensors base"
        ),
    )

    @field_validator("backend")
    @classmethod
    def _registered_backend(cls, v: str) -> str:
        return MERGE_BACKENDS.check(v)

    @model_validator(mode="after")
    def _fused_needs_streaming(self) -> MergeSettings:
        if self.fused_convert and self.backend != "streaming":
            raise ValueError(
                f"merge.fused_convert applies the streaming merge's math inside the converter; merge.backend is "
                f"{self.backend}: set merge.backend: streaming or merge.fused_convert: false"
            )
        return self


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


def _check_base(settings: MergeSettings, ref: str, base_dir: Path, adapter_cfg: dict[str, Any]) -> dict[str, Any]:
    """The base's config, after refusing a quantized base and judging a base the adapter was not trained on."""
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
    return base_config


def _qlora_choice(
    settings: MergeSettings, adapter_dir: Path, adapter_cfg: dict[str, Any]
) -> tuple[q4.QLoraDetection | None, QLoraFormat | None]:
    """(what the records say about a 4-bit base, the format to round-trip the base through or None)."""
    found = q4.detect(adapter_dir, adapter_cfg)
    fmt = q4.decide(settings.qlora, settings.qlora_format, found)
    if fmt is not None:
        log.info(
            "QLoRA: merging into base weights round-tripped through %s (%s)",
            fmt.describe(),
            found.reason if found else "merge.qlora: roundtrip",
        )
    elif found is not None and settings.qlora == "original":
        log.info("QLoRA adapter detected (%s): merging into the 16-bit weights (merge.qlora: original)", found.reason)
    return found, fmt


def _plan(
    backend: MergeBackend, base_dir: Path, base_config: dict[str, Any], adapter_cfg: dict[str, Any], tensors: Any
) -> MergePlan | None:
    """The header-level plan; None for a .bin base when the backend reads those (the checks are skipped)."""
    try:
        plan = build_plan(base_dir, base_config, adapter_cfg, tensors)
    except PermanentError as exc:
        if backend.reads_bin_weights and "PyTorch .bin weights" in str(exc):
            log.info(
                "base has .bin weights: the %s backend loads them; the tensor-level checks are skipped", backend.name
            )
            return None
        raise
    for note in plan.notes:
        log.warning(note)
    return plan


def available_backend(name: str) -> MergeBackend:
    """The registered backend `name`, after checking it can run here (else: why, and the ones that can)."""
    backend = MERGE_BACKENDS.lookup(name)
    reason = backend.unavailable()
    if reason:
        others = [b for b in MERGE_BACKENDS.values() if b.name != name and not b.unavailable()]
        raise PermanentError(
            f"merge.backend: {name} {reason}",
            hint="use "
            + " or ".join(f"merge.backend: {b.name} ({b.description})" for b in others)
            + ("" if others else "another backend once its requirements are installed"),
        )
    return backend


def _not_a_causal_lm(folder: Path) -> str | None:
    """Why the logit check (prompts through AutoModelForCausalLM) does not apply to this model, or None when
    it does: its config names an architecture other than the causal LM class of its model type (a speech
    or vision model: Whisper, wav2vec2, ...). A config without architectures is checked as before."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = [str(a) for a in config.get("architectures") or []]
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(config.get("model_type")))
    if not archs or causal in archs:
        return None
    return f"the logit check runs causal LMs; {', '.join(archs)} is checked per tensor only"


def _verify(
    settings: MergeSettings, job: MergeJob, merged_dir: Path, base_bytes: int, merged_state: Any = None
) -> dict[str, Any]:
    """The logits check's meta; raises when the merged model does not reproduce PeftModel(base, adapter)."""
    if not (settings.verify == "always" or (settings.verify == "auto" and base_bytes <= settings.verify_max_gb * 1e9)):
        skipped = (
            f"base weights {base_bytes / 1e9:.2f} GB > merge.verify_max_gb {settings.verify_max_gb}"
            if settings.verify == "auto"
            else "merge.verify: never"
        )
        return {"max_abs_logit_diff": None, "verify_skipped": skipped}
    not_causal = _not_a_causal_lm(merged_dir)
    if not_causal:  # a speech or vision model: no prompt logits to compare
        return {"max_abs_logit_diff": None, "verify_skipped": not_causal}
    from tasks.merge.verify import verify_logits

    result = verify_logits(job.base_dir, job.adapter_dir, merged_dir, job.plan, job.qlora, job.dtype, merged_state)
    problem = verification_problem(result, settings.verify_tolerance)
    if problem:
        raise PermanentError(
            f"{problem}; merged/ was not written",
            hint=(
                "try merge.backend: peft and report the adapter; or raise merge.verify_tolerance if a "
                "lower merge.dtype explains it"
            ),
        )
    return {**result, "verify_passed": True}


def _check_tensors(settings: MergeSettings, job: MergeJob, merged_dir: Path) -> dict[str, Any]:
    """The per-tensor check (every size); raises when a written tensor is not W + s·B·A of the files."""
    if settings.verify == "never":
        return {"tensor_check": None}
    if job.plan is None:
        return {"tensor_check": None, "tensor_check_skipped": "the base has .bin weights (no headers to read rows by)"}
    report = check_merged_folder(job.plan, merged_dir, job.qlora, settings.verify_rows)
    meta = report.meta()
    log.info(
        "per-tensor check: %d tensors, %d rows recomputed from the base and adapter files; worst %s (%s ulps), %.1f s",
        meta["tensors_checked"],
        meta["rows_checked"],
        meta["worst_tensor"],
        meta["max_err_ulps"],
        meta["seconds"],
    )
    problem = report.problem()
    if problem:
        raise PermanentError(
            f"{problem}; merged/ was not written",
            hint="try merge.backend: peft, and report the adapter and the backend that wrote the wrong tensor",
        )
    return {"tensor_check": meta}


def _untie_config(out: Path) -> None:
    """The merged model has its own lm_head (tasks/merge/plan.py: the untie): say so in config.json."""
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tie_word_embeddings"] = False
    for sub in ("text_config", "llm_config"):
        if isinstance(cfg.get(sub), dict) and "tie_word_embeddings" in cfg[sub]:
            cfg[sub]["tie_word_embeddings"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _adapter_meta(adapter_cfg: dict[str, Any], plan: MergePlan | None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "r": adapter_cfg.get("r"),
        "lora_alpha": adapter_cfg.get("lora_alpha"),
        "use_rslora": bool(adapter_cfg.get("use_rslora")),
        "use_dora": bool(adapter_cfg.get("use_dora")),
        "fan_in_fan_out": bool(adapter_cfg.get("fan_in_fan_out")),
        "modules_to_save": adapter_cfg.get("modules_to_save") or [],
        "tied_embeddings": bool(plan and plan.tied_to),
        "untied_head": bool(plan and plan.untied),
    }
    if plan is not None:
        meta["scalings"] = sorted({round(op.scaling, 6) for ops in plan.ops.values() for op in ops})
    return meta


def _recipe(settings: MergeSettings, job: MergeJob, adapter: Artifact, base_key: str, *, check: bool) -> Any:
    """The fused-convert recipe (tasks/merge/fused.py: FusedRecipe) for this merge job."""
    from tasks.merge.fused import FusedRecipe

    return FusedRecipe(
        base_dir=str(job.base_dir),
        base_key=base_key or job.base_ref,
        adapter_dir=str(job.adapter_dir),
        adapter_sha256=adapter.sha256,
        dtype=job.dtype,
        target_st=job.target_st,
        qlora=job.qlora,
        check=check,
        verify_rows=settings.verify_rows,
    )


def _fused_recipe(settings: MergeSettings, job: MergeJob, adapter: Artifact, base_key: str, tmp: Path) -> dict:
    """merged/ for the fused convert (tasks/merge/fused.py): the recipe instead of the weights; the logit check on
    the merged tensors made in memory. Returns the artifact's meta."""
    from tasks.merge.fused import merged_state, plan_of

    if job.plan is None:
        raise PermanentError(
            f"merge.fused_convert reads the base's safetensors, and {job.base_dir} has PyTorch .bin weights",
            hint="set merge.fused_convert: false (and merge.backend: peft) for this base",
        )
    recipe = _recipe(settings, job, adapter, base_key, check=settings.verify != "never")
    recipe.write(tmp)
    meta: dict[str, Any] = {
        "fused_convert": True,
        "tensor_check": None,
        "tensor_check_at": "convert: every tensor the converter reads, as it is made"
        if settings.verify != "never"
        else None,
    }
    plan = job.plan
    meta["tokenizer_from"] = copy_side_files(
        job.base_dir, job.adapter_dir, tmp, None if settings.dtype == "auto" else job.dtype
    )
    if plan.untied:
        _untie_config(tmp)
    # the plan was made from the adapter's header; the check that makes the merged tensors needs its values
    meta.update(
        _verify(settings, job, tmp, plan.base_bytes(), lambda: merged_state(plan_of(recipe), job.target_st, job.qlora))
    )
    return meta


def _shared_read(
    settings: MergeSettings,
    job: MergeJob,
    adapter: Artifact,
    base_key: str,
    tmp: Path,
    shared: SharedRead,
    started: float,
    out_name: str,
) -> dict[str, Any]:
    """merged/ and the GGUF from one read of the base (merge.fused_convert while a later stage needs merged/'s
    weights): llama.cpp's converter runs once, through the fused source, which writes each merged tensor both
    into the GGUF and into merged/'s shards (the streaming merge's layout; untouched tensors copied from the
    base). The checks then run on merged/ as after any merge; the GGUF gets its final name only when they pass,
    and is recorded (`premade_gguf`: its digest, the settings it was made with) for the convert stage to reuse.
    Returns the artifact's meta."""
    from tasks.core.atomic import atomic_path
    from tasks.core.hashing import stat_key
    from tasks.gguf.convert import convert_with_merged, gguf_name
    from tasks.merge.fused import RECIPE_FILE

    plan = job.plan
    if plan is None:
        raise PermanentError(
            f"merge.fused_convert reads the base's safetensors, and {job.base_dir} has PyTorch .bin weights",
            hint="set merge.fused_convert: false (and merge.backend: peft) for this base",
        )
    meta: dict[str, Any] = {
        "fused_convert": True,
        "shared_read": True,
        "tokenizer_from": copy_side_files(
            job.base_dir, job.adapter_dir, tmp, None if settings.dtype == "auto" else job.dtype
        ),
    }
    if plan.untied:
        _untie_config(tmp)
    # check=False: the per-tensor check reads merged/'s files below, as after the streaming merge
    _recipe(settings, job, adapter, base_key, check=False).write(tmp)
    final = Path(shared.gguf_dir) / gguf_name(shared.model_name, shared.outtype)
    with atomic_path(final) as gguf_tmp:
        record = convert_with_merged(
            tmp, tmp, shared.convert_settings(), gguf_tmp, shared.model_name, view_name=out_name
        )
        (tmp / RECIPE_FILE).unlink()
        fused_report = dict(record.get("fused") or {})
        meta.update(fused_report.pop("merged_weights", None) or {})
        record["fused"] = fused_report
        meta.update(_check_tensors(settings, job, tmp))
        meta["merge_seconds"] = round(time.monotonic() - started, 3)
        meta.update(_verify(settings, job, tmp, plan.base_bytes()))
    size, mtime = stat_key(final)
    meta["premade_gguf"] = {**record, "path": str(final.resolve()), "size": size, "mtime_ns": mtime}
    return meta


def merge(
    adapter: Artifact,
    settings: MergeSettings,
    out_dir: Path,
    default_base: str = "",
    base_key: str = "",
    fused: bool = False,
    shared: SharedRead | None = None,
) -> Artifact:
    """Merge `adapter` into its base model; write merged/ atomically; return the 'merged' artifact.

    `fused` (merge.fused_convert, when no later stage needs the merged weights): everything is checked as
    usual, and merged/ holds the config, tokenizer and a fused.json recipe; the convert stage applies the adapter
    while converting (tasks/merge/fused.py). `shared` (merge.fused_convert when a later stage needs the merged
    weights): one converter run writes merged/'s weights and the GGUF (`_shared_read`)."""
    started = time.monotonic()
    backend = available_backend(settings.backend)  # fail before any work
    adapter_dir = adapter.local_path
    # fused: the converter's process does the arithmetic, so the checks here need the adapter's shapes only
    adapter_cfg, tensors = load_adapter(adapter_dir, values=not fused)
    ref = base_reference(settings, default_base, adapter_cfg)
    base_dir = resolve_base(ref)
    assert base_dir is not None
    base_config = _check_base(settings, ref, base_dir, adapter_cfg)
    qlora_found, qlora_fmt = _qlora_choice(settings, adapter_dir, adapter_cfg)
    plan = _plan(backend, base_dir, base_config, adapter_cfg, tensors)

    base_dtype = _base_dtype(plan, base_config)
    job = MergeJob(
        adapter_dir=adapter_dir,
        base_dir=base_dir,
        base_ref=ref,
        plan=plan,
        dtype=base_dtype if settings.dtype == "auto" else settings.dtype,
        target_st=None if settings.dtype == "auto" else TORCH_TO_ST[settings.dtype],
        qlora=qlora_fmt,
        max_shard_size=settings.max_shard_size,
    )
    base_bytes = plan.base_bytes() if plan is not None else sum(f.stat().st_size for f in base_dir.glob("*.bin"))
    needed = (output_bytes(plan, job.target_st) if plan is not None else base_bytes) + _dir_size(base_dir) - base_bytes
    disk_preflight(
        out_dir.parent,
        max(_dir_size(base_dir) - base_bytes if fused else needed, 0),
        "the merged model's side files and recipe" if fused else "the merged model",
    )

    meta = _merge_meta(backend, job, adapter_cfg, qlora_found)
    if shared is not None and not fused:
        with atomic_dir(out_dir) as tmp:
            meta.update(_shared_read(settings, job, adapter, base_key, tmp, shared, started, out_dir.name))
        meta["seconds"] = round(time.monotonic() - started, 3)
        return _merged_artifact(out_dir, adapter, base_key or ref, settings, meta)
    if fused:
        with atomic_dir(out_dir) as tmp:
            meta.update(_fused_recipe(settings, job, adapter, base_key, tmp))
        meta["merge_seconds"] = meta["seconds"] = round(time.monotonic() - started, 3)
        return _merged_artifact(out_dir, adapter, base_key or ref, settings, meta)
    with atomic_dir(out_dir) as tmp:
        with Progress(f"merge ({backend.name})", max(base_bytes, 1)) as progress:
            meta.update(backend.run(job, tmp, progress))
        meta.update(_check_tensors(settings, job, tmp))
        meta["tokenizer_from"] = copy_side_files(
            base_dir, adapter_dir, tmp, None if settings.dtype == "auto" else job.dtype
        )
        if plan is not None and plan.untied:
            _untie_config(tmp)
        meta["merge_seconds"] = round(time.monotonic() - started, 3)
        meta.update(_verify(settings, job, tmp, base_bytes))
    meta["seconds"] = round(time.monotonic() - started, 3)
    return _merged_artifact(out_dir, adapter, base_key or ref, settings, meta)


def _merge_meta(backend: MergeBackend, job: MergeJob, adapter_cfg: dict[str, Any], qlora_found: Any) -> dict[str, Any]:
    """What the merged record says about how it was made (before the backend and the checks add theirs)."""
    fmt = job.qlora
    return {
        "backend": backend.name,
        "base_model": job.base_ref,
        "base_dir": str(job.base_dir),
        "adapter_base_model": str(adapter_cfg.get("base_model_name_or_path") or ""),
        "dtype": job.dtype,
        **_adapter_meta(adapter_cfg, job.plan),
        "qlora_detected": qlora_found.reason if qlora_found else None,
        "qlora_source": qlora_found.source if qlora_found else None,
        "qlora_base": f"{fmt.tag}-roundtrip" if fmt else "original",
        "qlora_format": fmt.model_dump() if fmt else None,
    }


def _merged_artifact(
    out_dir: Path, adapter: Artifact, base: str, settings: MergeSettings, meta: dict[str, Any]
) -> Artifact:
    """The `merged` record: its inputs are the adapter's digest and the base (its key, else the reference)."""
    return Artifact.from_path(
        out_dir,
        name="merged",
        kind=ArtifactKind.MERGED,
        stage=STAGE,
        inputs={adapter.name: adapter.sha256, "base": base},
        settings=settings,
        tools=["torch", "safetensors", "transformers", "peft"],
        meta=meta,
    )


@stage_task(STAGE)
def merge_task(
    adapter: Artifact,
    settings: MergeSettings,
    out_dir: Path,
    default_base: str = "",
    base_key: str = "",
    fused: bool = False,
    shared: SharedRead | None = None,
) -> Artifact:
    """The cache key covers the whole merge package (tasks/core/caching.py); base_key stands for the base."""
    return merge(adapter, settings, out_dir, default_base, base_key, fused, shared)
