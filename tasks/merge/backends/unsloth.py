"""The `unsloth` merge backend: unsloth's merged 16-bit save, on a CUDA GPU only.

Left to itself, unsloth loads the base named in the adapter's `base_model_name_or_path` (often a path on
the training box, or a `-bnb-4bit` repo) and may swap a Hub id for its own pre-quantized copy. The stage
verifies the merge against the base it resolved from `merge.base_model`, so this backend hands unsloth that
same resolved folder (`use_exact_model_name`), in the dtype the stage chose (`merge.dtype`), in 4 bits only
when the stage's QLoRA choice round-trips the base (with that format's bitsandbytes options), attaches the
adapter with peft, and then checks what unsloth reports having loaded against what it was asked for; the
facts go into the artifact's meta (`unsloth_loaded`). What cannot be honoured fails before any loading,
naming the setting: a float32 output (unsloth writes 16-bit merges) or a QLoRA block size other than
transformers' 64.

Not yet run on a GPU in this project (issue 19: `python -m benchmarks.gpu_bench --all` is the prepared
check). Without CUDA or without the unsloth package, `unavailable` says so and the stage fails at once,
naming the other backends.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tasks.core.errors import PermanentError
from tasks.core.progress import Progress
from tasks.merge.backends.base import MergeBackend, MergeJob

SIXTEEN_BIT = ("bfloat16", "float16")
BNB_BLOCKSIZE = 64  # transformers' BitsAndBytesConfig has no block-size option: 4-bit loading uses 64


@dataclass(frozen=True)
class UnslothLoad:
    """What `FastLanguageModel.from_pretrained` is asked to load, decided from the stage's job (no GPU needed)."""

    model_name: str  # the resolved local base folder: the one the stage verifies the merge against
    dtype: str  # bfloat16 or float16
    load_in_4bit: bool  # True only for a QLoRA round-trip (the stage's choice)
    quant_type: str | None = None  # nf4 / fp4 when load_in_4bit
    double_quant: bool | None = None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for FastLanguageModel.from_pretrained (imports torch/transformers)."""
        import torch

        dtype = getattr(torch, self.dtype)
        kw: dict[str, Any] = {
            "model_name": self.model_name,
            "dtype": dtype,
            "load_in_4bit": self.load_in_4bit,
            "use_exact_model_name": True,  # never swap the base for unsloth's own pre-quantized copy
            "local_files_only": True,  # the stage already resolved the base to a local folder
        }
        if self.load_in_4bit:
            from transformers import BitsAndBytesConfig

            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=self.quant_type,
                bnb_4bit_use_double_quant=bool(self.double_quant),
                bnb_4bit_compute_dtype=dtype,
            )
        else:
            kw["load_in_16bit"] = True
        return kw


def load_plan(job: MergeJob) -> UnslothLoad:
    """The load unsloth must do for `job`, or a PermanentError naming the setting it cannot honour."""
    if job.dtype not in SIXTEEN_BIT:
        raise PermanentError(
            f"merge.backend: unsloth writes 16-bit merges, and the merged dtype would be {job.dtype}"
            + (" (the base's)" if job.target_st is None else " (merge.dtype)"),
            hint="set merge.dtype: bfloat16 or float16, or use merge.backend: streaming (any dtype)",
        )
    fmt = job.qlora
    if fmt is not None and fmt.blocksize != BNB_BLOCKSIZE:
        raise PermanentError(
            f"merge.backend: unsloth loads 4-bit bases in blocks of {BNB_BLOCKSIZE}, and the adapter trained on "
            f"{fmt.describe()}",
            hint="use merge.backend: streaming (it reproduces any block size), or merge.qlora: original",
        )
    return UnslothLoad(
        model_name=str(job.base_dir),
        dtype=job.dtype,
        load_in_4bit=fmt is not None,
        quant_type=fmt.quant_type if fmt else None,
        double_quant=fmt.double_quant if fmt else None,
    )


def loaded_facts(model: Any) -> dict[str, Any]:
    """What unsloth actually loaded: the folder its config came from, the weights' dtype, 4-bit or not."""
    cfg = model.config
    quant = getattr(cfg, "quantization_config", None)
    if quant is not None and hasattr(quant, "to_dict"):
        quant = quant.to_dict()
    quant = quant if isinstance(quant, dict) else {}
    return {
        "name_or_path": str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "name_or_path", "")),
        "dtype": str(getattr(model, "dtype", "")).removeprefix("torch."),
        "load_in_4bit": bool(getattr(model, "is_loaded_in_4bit", False) or quant.get("load_in_4bit")),
        "quant_type": quant.get("bnb_4bit_quant_type") if quant.get("load_in_4bit") else None,
        "double_quant": quant.get("bnb_4bit_use_double_quant") if quant.get("load_in_4bit") else None,
    }


def check_loaded(load: UnslothLoad, facts: dict[str, Any]) -> None:
    """Fail when unsloth loaded something other than what it was asked for: the stage's verification would
    then compare the merge with a base it was not made from."""
    problems = []
    got = facts.get("name_or_path") or ""
    if not got or Path(got).expanduser().resolve() != Path(load.model_name).resolve():
        problems.append(f"the base {got or '(unnamed)'!r} instead of {load.model_name!r}")
    if facts.get("dtype") != load.dtype:
        problems.append(f"dtype {facts.get('dtype')} instead of {load.dtype}")
    if bool(facts.get("load_in_4bit")) != load.load_in_4bit:
        problems.append("4-bit weights" if facts.get("load_in_4bit") else "16-bit weights, not the 4-bit round trip")
    elif load.load_in_4bit and (facts.get("quant_type"), bool(facts.get("double_quant"))) != (
        load.quant_type,
        bool(load.double_quant),
    ):
        problems.append(f"4-bit format {facts.get('quant_type')}/double quant {facts.get('double_quant')}")
    if problems:
        raise PermanentError(
            "merge.backend: unsloth loaded " + "; ".join(problems) + "; merged/ was not written",
            hint="use merge.backend: streaming, and report the unsloth version with the base model",
        )


def unsloth_merge(job: MergeJob, out_dir: Path) -> dict[str, Any]:
    """Load the stage's base with unsloth as `load_plan` says, attach the adapter, save the merged 16-bit model."""
    from importlib.metadata import version

    load = load_plan(job)  # what cannot be honoured fails before anything loads
    # unsloth first: it patches transformers and peft when imported
    from unsloth import FastLanguageModel  # type: ignore[import-not-found]
    from unsloth.save import patch_saving_functions  # type: ignore[import-not-found]

    model, tokenizer = FastLanguageModel.from_pretrained(**load.kwargs())
    facts = loaded_facts(model)
    check_loaded(load, facts)
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(job.adapter_dir), is_trainable=False)
    model = patch_saving_functions(model) or model
    model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_16bit")
    return {
        "shards": len(list(out_dir.glob("*.safetensors"))),
        "unsloth_version": version("unsloth"),
        "unsloth_requested": asdict(load),
        "unsloth_loaded": facts,
    }


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
        return unsloth_merge(job, out_dir)
