"""Stage 9, serve: an OpenAI-compatible server for a chosen GGUF on a port from a pool.

Settings only for now: the stage's work lands with its own issue, and the flow skips a stage whose
module does not provide `run_stage` yet (it says so in the summary).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.core.settings import SecretRef, StrictModel

STAGE = "serve"


class ServeSettings(StrictModel):

    quant: str = "Q4_K_M"
    host: str = "127.0.0.1"
    port_range: tuple[int, int] = (8100, 8200)
    keep_running: bool = False
