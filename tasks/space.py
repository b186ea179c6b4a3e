"""Stage 7, Space deploy: a Gradio chat demo for the chosen GGUF.

Settings only for now: the stage's work lands with its own issue, and the flow skips a stage whose
module does not provide `run_stage` yet (it says so in the summary).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.core.settings import SecretRef, StrictModel

STAGE = "space"


class SpaceSettings(StrictModel):

    space_id: str = Field("", description="owner/name of the Space; empty: <user>/<model>-demo")
    quant: str = Field("Q4_K_M", description="which GGUF the demo runs")
    hardware: str = "cpu-basic"
    sleep_time: int | None = Field(None, description="seconds of inactivity before the Space sleeps")
    read_token: SecretRef | None = Field(None, description="read-only token given to the Space as the HF_TOKEN secret")
