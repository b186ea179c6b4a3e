"""The logits check of a merged model, whichever backend made it: the merged model against PeftModel(base, adapter).

Run in float32 on several prompts: fixed texts (one through the chat template when there is one) and, for a LoRA
or saved copy on the input embedding, prompts made of the very token ids whose embedding rows the adapter
changed (a LoRA on `embed_tokens` trains only the rows of the tokens it saw, the non-zero columns of
lora_embedding_A), so those rows are exercised, not just the rows of one fixed prompt. Every position of every
prompt counts.

The limit is computed, not guessed: the merged weights are rounded to the output dtype, and that alone moves
the logits. We measure how much: peft merges the adapter into the float32 base (merge_and_unload), the
result is rounded to the output dtype, and the largest logit change against PeftModel on the same prompts is
the rounding allowance. The merge passes when its difference is at most ROUNDING_FACTOR x that allowance plus
`merge.verify_tolerance` x the largest reference logit (float32 arithmetic: the same sums in another order);
both are logged and stored in the artifact's meta. A float32 merge gets no allowance beyond the tolerance.

A base with tied embeddings whose head or embedding the adapter changes is untied before the reference is
built (as the merge unties it, tasks/merge/plan.py): that changes nothing in PeftModel's forward pass.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.merge import qlora as q4
from tasks.merge.loading import load_base
from tasks.merge.plan import MergePlan, input_embedding
from tasks.merge.safetensors_io import read_tensor

log = logging.getLogger("loraship.merge")

VERIFY_PROMPTS = (
    "The quick brown fox jumps over the lazy dog. Once upon a time there was a small model that learned to count: "
    "1 2 3",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12. Punctuation, quotes 'single' and \"double\"; colons: yes.",
)
CHAT = [{"role": "user", "content": "Tell me a story about a cat, a dog and an owl."}]
PROMPT_TOKENS = 64
#: The rounding allowance is multiplied by this: two roundings of the same values (ours, and the reference's)
#: can fall on different sides, and peft rounds its delta before adding it.
ROUNDING_FACTOR = 2.0
#: The reference logits kept for the comparison (tokens x vocabulary x 4 bytes) stay under this.
MAX_LOGIT_BYTES = 256 * 1024 * 1024


def changed_embedding_rows(plan: MergePlan | None) -> list[int]:
    """Token ids whose input-embedding row the adapter changes (LoRA: non-zero A columns; saved copy: changed rows)."""
    if plan is None:
        return []
    name = input_embedding(plan.base_tensors)
    if name is None:
        return []
    import torch

    rows: set[int] = set()
    for op in plan.ops.get(name, []):
        rows.update(torch.nonzero(op.A.abs().sum(dim=0)).flatten().tolist())
    if name in plan.replace:
        base = read_tensor(plan.base_tensors[name]).float()
        diff = (plan.replace[name].float() - base).abs().sum(dim=1)
        rows.update(torch.nonzero(diff).flatten().tolist())
    return sorted(rows)


def verification_prompts(tokenizer: Any, plan: MergePlan | None, vocab_size: int) -> tuple[list[list[int]], dict]:
    """Token id lists to run, and what they cover (changed embedding rows, how many of them made it in)."""
    import torch

    prompts = [tokenizer(t)["input_ids"][:PROMPT_TOKENS] for t in VERIFY_PROMPTS]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        prompts.append(list(ids)[:PROMPT_TOKENS])
    budget = max(4 * PROMPT_TOKENS, MAX_LOGIT_BYTES // (4 * max(vocab_size, 1)))
    changed = [r for r in changed_embedding_rows(plan) if r < vocab_size]
    room = max(budget - sum(len(p) for p in prompts), 0)
    chosen = changed
    if len(changed) > room:  # too many to run them all: a seeded sample, and the record says so
        g = torch.Generator().manual_seed(0)
        chosen = sorted(torch.tensor(changed)[torch.randperm(len(changed), generator=g)[:room]].tolist())
    for i in range(0, len(chosen), PROMPT_TOKENS):
        prompts.append(chosen[i : i + PROMPT_TOKENS])
    coverage = {"embedding_rows_changed": len(changed), "embedding_rows_covered": len(chosen)}
    return [p for p in prompts if p], coverage


def _logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits.float()[0]


def _round_params(model: Any, dtype: str) -> None:
    import torch

    target = getattr(torch, dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_(p.to(target).to(p.dtype))


def _model_from_state(merged_dir: Path, state: dict[str, Any]) -> Any:
    """A float32 model of merged_dir's config holding `state` (every tensor merged/ would hold)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(merged_dir)), dtype=torch.float32)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"the merged tensors do not fit the model of {merged_dir / 'config.json'}: missing "
            f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    return model


def verify_logits(
    base_dir: Path,
    adapter_dir: Path,
    merged_dir: Path,
    plan: MergePlan | None = None,
    qlora: q4.QLoraFormat | None = None,
    out_dtype: str = "float32",
    merged_state: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Largest |logit| difference between the merged model and PeftModel(base, adapter), in float32, with the
    rounding allowance of `out_dtype` measured on the same prompts and the adapter's own effect.

    `merged_state` (the fused path, merged/ without weights): the merged tensors made in memory, loaded into a
    model built from merged_dir's config, instead of reading weights from merged_dir."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    base = load_base(base_dir, "float32", qlora, untie=bool(plan and plan.untied))
    prompts, coverage = verification_prompts(tok, plan, base.get_input_embeddings().weight.shape[0])
    ref_model = PeftModel.from_pretrained(base, str(adapter_dir))
    ref_model.eval()
    refs = [_logits(ref_model, p) for p in prompts]
    effect = 0.0
    with ref_model.disable_adapter():
        for p, ref in zip(prompts, refs):
            effect = max(effect, float((_logits(ref_model, p) - ref).abs().max()))
    allowance = 0.0
    if out_dtype != "float32":
        exact = ref_model.merge_and_unload(safe_merge=True)  # peft's own float32 merge
        _round_params(exact, out_dtype)
        for p, ref in zip(prompts, refs):
            allowance = max(allowance, float((_logits(exact, p) - ref).abs().max()))
        del exact
    del ref_model, base
    gc.collect()
    if merged_state is None:
        merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    else:
        merged = _model_from_state(merged_dir, merged_state())
    merged.eval()
    diff, where = 0.0, (0, 0)
    for i, (p, ref) in enumerate(zip(prompts, refs)):
        d = (_logits(merged, p) - ref).abs().amax(dim=1)
        if float(d.max()) > diff or not math.isfinite(float(d.max())):
            diff, where = float(d.max()), (i, int(d.argmax()))
    del merged
    gc.collect()
    return {
        "max_abs_logit_diff": diff,
        "max_diff_at": {"prompt": where[0], "position": where[1]},
        "reference_max_abs_logit": max(float(r.abs().max()) for r in refs),
        "adapter_effect_max_abs_logit": effect,
        "rounding_allowance": allowance,
        "verify_dtype": out_dtype,
        "verify_prompts": len(prompts),
        "verify_tokens": sum(len(p) for p in prompts),
        **coverage,
    }


def logit_limit(result: dict[str, Any], tolerance: float) -> float:
    """What the merge may differ by: ROUNDING_FACTOR x the measured rounding allowance + the float32 tolerance."""
    return ROUNDING_FACTOR * result["rounding_allowance"] + tolerance * max(result["reference_max_abs_logit"], 1.0)


def verification_problem(result: dict[str, Any], tolerance: float) -> str | None:
    """Judge the logit check: None when the merged model reproduces PeftModel(base, adapter) within the limit."""
    diff = result["max_abs_logit_diff"]
    limit = logit_limit(result, tolerance)
    result["verify_limit"] = limit
    effect = result["adapter_effect_max_abs_logit"]
    log.info(
        "verification: max |logit difference| %.3g against PeftModel(base, adapter) on %d prompts / %d tokens; limit "
        "%.3g = %g x rounding allowance %.3g (%s) + %g x max |logit| %.3g; the adapter changes logits by up to %.3g",
        diff,
        result["verify_prompts"],
        result["verify_tokens"],
        limit,
        ROUNDING_FACTOR,
        result["rounding_allowance"],
        result["verify_dtype"],
        tolerance,
        result["reference_max_abs_logit"],
        effect,
    )
    if result.get("embedding_rows_changed", 0) > result.get("embedding_rows_covered", 0):
        log.warning(
            "the adapter changes %d embedding rows; the logit check ran %d of them (the per-tensor check covers a "
            "sample of the rest)",
            result["embedding_rows_changed"],
            result["embedding_rows_covered"],
        )
    if effect <= limit:
        log.warning(
            "the adapter moves the logits by %.3g, not more than the verification limit %.3g: a lost adapter would "
            "pass the logit check (the per-tensor check still compares every merged tensor)",
            effect,
            limit,
        )
    if not diff == diff:  # NaN
        return "the merged model's logits are NaN"
    if diff <= limit:
        return None
    at = result.get("max_diff_at", {})
    return (
        f"the merged model's logits differ from PeftModel(base, adapter) by {diff:.4g} (limit {limit:.4g} = "
        f"{ROUNDING_FACTOR:g} x the {result['verify_dtype']} rounding allowance {result['rounding_allowance']:.3g} + "
        f"{tolerance:g} x {result['reference_max_abs_logit']:.3g}; prompt {at.get('prompt')}, position "
        f"{at.get('position')}; the adapter itself changes them by {effect:.4g})"
    )
