"""Where LM Studio (and its `lms` CLI) lives on the machine that should get the models."""

from __future__ import annotations

from typing import ClassVar, Literal

from prefect.blocks.core import Block
from pydantic import Field


class LMStudioTarget(Block):
    """An LM Studio installation: its home (models folder inside), publisher name, how to link files."""

    _block_type_name: ClassVar[str] = "LM Studio Target"
    _block_type_slug: ClassVar[str] = "lm-studio-target"
    _description: ClassVar[str] = "LM Studio home folder, publisher and link mode for GGUF files."

    home: str = Field("~/.lmstudio", description="LM Studio home; models go to <home>/models/<publisher>/<model>-GGUF/")
    publisher: str = "loraship"
    link_mode: Literal["symlink", "hardlink", "copy"] = "symlink"
    api_url: str = Field("http://127.0.0.1:1234/v1", description="LM Studio's OpenAI-compatible server")
