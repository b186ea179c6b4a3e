"""Stage 8, LM Studio / Ollama: link the GGUFs where the desktop apps find them.

Settings only for now: the stage's work lands with its own issue, and the flow skips a stage whose
module does not provide `run_stage` yet (it says so in the summary).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.core.settings import SecretRef, StrictModel

STAGE = "local_deploy"


class LocalDeploySettings(StrictModel):

    lmstudio_enabled: bool = True
    lmstudio_home: str | None = Field(None, description="LM Studio home (default: ~/.lmstudio, or its configured models folder)")
    publisher: str = "loraship"
    link_mode: Literal["symlink", "hardlink", "copy"] = "symlink"
    ollama_enabled: bool = True
