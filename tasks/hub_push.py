"""Stage 5, Hub push: the GGUFs, card and manifest to a Hugging Face model repo in one commit.

Settings only for now: the stage's work lands with its own issue, and the flow skips a stage whose
module does not provide `run_stage` yet (it says so in the summary).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.core.settings import SecretRef, StrictModel

STAGE = "hub_push"


class HubSettings(StrictModel):

    repo_id: str = Field("", description="owner/name of the model repo; empty: <user>/<model>-GGUF")
    private: bool = False
    token: SecretRef | None = Field(None, description="write token reference, e.g. 'env:HF_TOKEN'; none: dry run")
