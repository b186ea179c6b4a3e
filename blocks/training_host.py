"""The training box: where the fine-tune ran and the adapter waits."""

from __future__ import annotations

from typing import ClassVar

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class TrainingHost(Block):
    """SSH access to a training machine (a vast.ai box, a lab server). The private key stays a SecretStr."""

    _block_type_name: ClassVar[str] = "Training Host"
    _block_type_slug: ClassVar[str] = "training-host"
    _main_secret: ClassVar[str] = "private_key"
    _description: ClassVar[str] = "SSH host, port, user and key of the machine where LoRA training ran."

    host: str = Field(description="hostname or IP address")
    port: int = Field(22, ge=1, le=65535)
    user: str = "root"
    private_key: SecretStr | None = Field(None, description="the private key's text (OpenSSH or PEM format)")
    known_hosts_entry: str | None = Field(
        None, description="a known_hosts line for this host; the host key is checked against it"
    )
    remote_path: str = Field("/workspace/output", description="default folder holding the training output")
