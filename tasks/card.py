"""Stage 6, model card: templates/model_card.md.j2 rendered from the manifest.

Settings only for now: the stage's work lands with its own issue, and the flow skips a stage whose
module does not provide `run_stage` yet (it says so in the summary).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.core.settings import SecretRef, StrictModel

STAGE = "card"


class CardSettings(StrictModel):

    template: str | None = Field(None, description="a user template path that overrides ours")
    license: str = "apache-2.0"
    language: list[str] = Field(default_factory=lambda: ["en"])
    description: str = ""
