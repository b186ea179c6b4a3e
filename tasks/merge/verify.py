"""The logits check of a merged model, whichever backend made it.

Verification runs the merged model and PeftModel(base, adapter) on one fixed prompt in float32 and
reports the largest logit difference (`verify_logits`); `verification_problem` judges it.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from tasks.merge.loading import load_base

log = logging.getLogger("loraship.merge")

VERIFY_PROMPT = (
    "The quick brown fox jumps over the lazy dog. Once upon a time there was a small model that learned to count: 1 2 3"
)


def _logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def verify_logits(
    base_dir: Path, adapter_dir: Path, merged_dir: Path, qlora_roundtrip: bool = False, prompt: str = VERIFY_PROMPT
) -> dict[str, Any]:
    """Largest |logit| difference between the merged model and PeftModel(base, adapter), in float32.

    Also reports how much the adapter changes the base's logits, so the merge error can be read
    against the size of the effect it must preserve.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    ids = tok(prompt, return_tensors="pt")["input_ids"][:, :64]
    base = load_base(base_dir, "float32", qlora_roundtrip)
    ref_model = PeftModel.from_pretrained(base, str(adapter_dir))
    ref_model.eval()
    ref = _logits(ref_model, ids)
    with ref_model.disable_adapter():
        plain = _logits(ref_model, ids)
    del ref_model, base
    gc.collect()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    merged.eval()
    got = _logits(merged, ids)
    del merged
    gc.collect()
    diff = float((got - ref).abs().max())
    return {
        "max_abs_logit_diff": diff,
        "reference_max_abs_logit": float(ref.abs().max()),
        "adapter_effect_max_abs_logit": float((ref - plain).abs().max()),
        "verify_prompt_tokens": int(ids.shape[1]),
    }


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
