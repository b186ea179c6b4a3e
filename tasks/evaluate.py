"""Stage 11, eval: compare the quantizations against each other and the F16.

Settings only for now: the stage's work lands with its own issue, and the flow skips a stage whose
module does not provide `run_stage` yet (it says so in the summary).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.core.settings import SecretRef, StrictModel

STAGE = "evaluate"


class EvalSettings(StrictModel):

    samples: str | None = Field(None, description="eval_samples.jsonl (prompt, reference, optional metric)")
    max_tokens: int = 32
