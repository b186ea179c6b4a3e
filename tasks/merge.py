"""Stage 2, merge: fold the LoRA adapter into the base model's weights (streaming, peft or unsloth).

Settings only for now: the stage's work lands with its own issue, and the flow skips a stage whose
module does not provide `run_stage` yet (it says so in the summary).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.core.settings import SecretRef, StrictModel

STAGE = "merge"


class MergeSettings(StrictModel):

    backend: Literal["streaming", "peft", "unsloth"] = "streaming"
    base_model: str = Field("", description="local folder or Hub id of the base model; empty: the adapter's base_model_name_or_path")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
