"""The download stage's settings (`source:` in the config), validated against the sources registry.

`source.kind` names a registered source (tasks/download/sources/) and the entry checks the rest of the
section. The vocabulary the modules share (STAGE, METADATA_FILES, NEVER_FETCH, ...) is in vocab.py and
re-exported here for the modules that import it from this one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.core.settings import SecretRef, StrictModel
from tasks.download.sources import SOURCES
from tasks.download.vocab import (  # noqa: F401 - re-exported
    ADAPTER_MARKER,
    DEFAULT_EXCLUDE,
    METADATA_FILES,
    NEVER_FETCH,
    STAGE,
    BytesHook,
    wanted,
)


class DownloadSettings(StrictModel):
    """Where the finished training run is: `local` (a folder here), `ssh` (a host) or `vastai` (an instance)."""

    kind: str = Field(
        "local",
        description=(
            f"where the run is: one of the registered sources ({', '.join(SOURCES.names())}; see "
            "tasks/download/sources/)"
        ),
    )
    path: str = Field(
        "",
        description=(
            "the run's output folder: a local path, or the path on the remote (default: the TrainingHost block's "
            "remote_path, else /workspace/output)"
        ),
    )
    include: list[str] = Field(
        default_factory=lambda: ["*"],
        description="glob patterns (matched from the right of the relative path) of files to fetch",
    )
    exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDE),
        description="glob patterns of files not to fetch (optimizer and RNG state of checkpoints by default)",
    )
    final_glob: str = Field(
        "final*",
        description=(
            "remote: when `path` holds no adapter_config.json, the newest folder matching this glob holding one "
            "is fetched"
        ),
    )
    checkpoint_glob: str = Field(
        "checkpoint-*", description="remote: else the matching checkpoint folder with the highest step"
    )
    # SSH
    host_block: str | None = Field(
        None,
        description=(
            "name of a saved TrainingHost block giving host, port, user, key and known_hosts entry; the fields "
            "below override it"
        ),
    )
    host: str | None = Field(None, description="SSH host name or address")
    port: int | None = Field(None, ge=1, le=65535, description="SSH port (default 22)")
    user: str | None = Field(None, description="SSH user (default root)")
    private_key: SecretRef | None = Field(
        None, description="reference to the private key's text: env:VAR, secret:NAME or block:training-host/NAME"
    )
    key_file: str | None = Field(
        None, description="path of a private key file (instead of private_key); neither: ssh-agent and ~/.ssh keys"
    )
    known_hosts: str = Field("~/.ssh/known_hosts", description="known_hosts file the host key is checked against")
    known_hosts_entry: str | None = Field(
        None, description="one extra known_hosts line for this host, e.g. '[1.2.3.4]:2222 ssh-ed25519 AAAA...'"
    )
    trust_on_first_use: bool = Field(
        False,
        description=(
            "accept an UNKNOWN host key once (logged with its fingerprint, appended to known_hosts); a changed "
            "key is always refused"
        ),
    )
    connect_timeout_s: float = Field(20.0, gt=0, description="seconds to wait for the SSH connection")
    io_timeout_s: int = Field(
        120, ge=10, description="rsync gives up (and the task retries) after this many seconds without data"
    )
    # vast.ai
    instance_id: int | None = Field(None, description="vast.ai instance id (kind: vastai)")
    vastai_api_key: SecretRef = Field(
        default_factory=lambda: SecretRef.model_validate("env:VAST_API_KEY"),
        description="reference to the vast.ai API key",
    )
    vastai_url: str = Field("https://console.vast.ai/api/v0", description="vast.ai API base URL")
    vastai_via: Literal["auto", "direct", "proxy"] = Field(
        "auto",
        description="direct: the instance's public address; proxy: vast.ai's ssh proxy; auto: direct when it has one",
    )
    # transfer
    transfer: Literal["auto", "rsync", "sftp"] = Field(
        "auto", description="auto: rsync over ssh when both sides have rsync, else SFTP with resume"
    )
    remote_rsync: str = Field("rsync", description="rsync program on the remote (rsync --rsync-path)")
    bwlimit_kbps: int | None = Field(None, ge=1, description="bandwidth limit in KiB/s (rsync --bwlimit)")
    compress: bool = Field(
        False,
        description=(
            "compress on the wire: zstd when both rsyncs support it, else zlib (adapters barely compress: off by "
            "default)"
        ),
    )

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        return SOURCES.check(v)

    @model_validator(mode="after")
    def _check(self) -> DownloadSettings:
        problems = SOURCES[self.kind].check(self)
        if self.private_key is not None and self.key_file:
            problems.append("give source.private_key or source.key_file, not both")
        if problems:
            raise ValueError("; ".join(problems))
        return self
