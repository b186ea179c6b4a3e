"""Hugging Face Hub credentials: a write token for pushing, a separate read-only token for Spaces."""

from __future__ import annotations

from typing import ClassVar

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class HubCredentials(Block):
    """Tokens for the Hub. The read token is what a demo Space gets, never the write token."""

    _block_type_name: ClassVar[str] = "Hub Credentials"
    _block_type_slug: ClassVar[str] = "hub-credentials"
    _main_secret: ClassVar[str] = "write_token"
    _description: ClassVar[str] = "Hugging Face write token (push) and read-only token (Spaces)."

    write_token: SecretStr = Field(description="a token with write access to the target namespace")
    read_token: SecretStr | None = Field(
        None, description="a read-only token given to demo Spaces as the HF_TOKEN secret"
    )
    endpoint: str | None = Field(None, description="Hub endpoint; empty: https://huggingface.co")
    namespace: str | None = Field(None, description="user or organisation to push to; empty: the token's user")
