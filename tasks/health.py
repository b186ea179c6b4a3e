"""Stage 10, health: file, API, model and system checks with a verdict.

Settings only for now: the stage's work lands with its own issue, and the flow skips a stage whose
module does not provide `run_stage` yet (it says so in the summary).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.core.settings import SecretRef, StrictModel

STAGE = "health"


class HealthSettings(StrictModel):

    test_prompts: list[str] = Field(default_factory=lambda: ["Hello!"])
    min_response_length: int = 1
    timeout_s: float = 60.0
