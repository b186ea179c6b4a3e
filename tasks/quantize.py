"""Stage 4, quantize: the F16 GGUF into several llama.cpp types, in parallel.

Settings only for now: the stage's work lands with its own issue, and the flow skips a stage whose
module does not provide `run_stage` yet (it says so in the summary).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.core.settings import SecretRef, StrictModel

STAGE = "quantize"


class QuantizeSettings(StrictModel):

    types: list[str] = Field(default_factory=lambda: ["Q4_K_M", "Q5_K_M", "Q8_0"])
    threads: int | None = Field(None, description="threads per job; None: split the machine's cores among the parallel jobs")
