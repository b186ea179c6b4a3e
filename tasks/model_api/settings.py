"""What a deployment is asked to be (`DeployRequest`) and what its server process is told (`ServerSpec`).

Both are pydantic models at the boundary: the CLI, the Prefect flow and the serve stage build a
`DeployRequest`, so a bad value fails before anything is downloaded, naming the field. The deploy step
writes a `ServerSpec` (a JSON file) for the server subprocess: everything it needs, nothing it must look up.
"""

from __future__ import annotations

import os
import re
from enum import StrEnum
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from tasks.core.constants import cache_root
from tasks.core.settings import StrictModel

#: Environment variable naming the loraship home (the deployments registry and logs live there).
HOME_ENV = "LORASHIP_HOME"
#: The port pool deployments are given ports from (seed 001).
DEFAULT_PORTS = (8100, 8200)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def loraship_home() -> Path:
    """`$LORASHIP_HOME`, else the project's cache root (`$LORASHIP_CACHE`, default ~/.cache/loraship)."""
    return Path(os.environ.get(HOME_ENV) or cache_root()).expanduser()


class Device(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class DType(StrEnum):
    AUTO = "auto"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"


class DeployRequest(StrictModel):
    """One deployment: which model, under which name, served how. The fields are the CLI's options."""

    model: str = Field(description="a Hub id (owner/name), a local model folder, or a run folder (its merged/)")
    name: str = Field(description="the deployment's name: unique among live deployments")
    task: str | None = Field(None, description="pipeline task (None: inferred from pipeline_tag / architectures)")
    port: int | None = Field(None, ge=1, le=65535, description="a fixed port (None: the first free one in port_range)")
    port_range: tuple[int, int] = Field(DEFAULT_PORTS, description="the pool ports are assigned from")
    host: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0 to serve the network)")
    device: Device = Field(Device.AUTO, description="auto: cuda when available, else cpu")
    dtype: DType = Field(DType.AUTO, description="auto: bfloat16/float16 on CUDA, float32 on CPU")
    revision: str | None = Field(None, description="Hub branch, tag or commit (None: main)")
    max_batch_size: int = Field(32, ge=1, le=4096, description="most inputs in one pipeline call (and per request)")
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="how long a batch waits for more requests")
    max_input_tokens: int = Field(512, ge=1, description="longest input accepted, in tokens (longer: 422)")
    download_timeout_s: float = Field(1800.0, gt=0, description="the whole download must finish within this")
    start_timeout_s: float = Field(600.0, gt=0, description="load + pipeline + first answer must finish within this")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")
    cache_dir: str | None = Field(None, description="Hub cache folder (None: huggingface_hub's, shared by all)")
    hub_endpoint: str | None = Field(None, description="Hub URL (None: $HF_ENDPOINT, else huggingface.co)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("name: letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model: give a Hub id, a model folder or a run folder")
        return v.strip()

    @field_validator("task")
    @classmethod
    def _task(cls, v: str | None) -> str | None:
        from tasks.model_api.tasks_table import canonical_task

        return None if v in (None, "", "auto") else canonical_task(v)

    @model_validator(mode="after")
    def _ports(self) -> DeployRequest:
        lo, hi = self.port_range
        if not (1 <= lo <= hi <= 65535):
            raise ValueError("port_range must be [low, high] with 1 <= low <= high <= 65535")
        return self


class ServerSpec(StrictModel):
    """What the server subprocess (`python -m tasks.model_api.server SPEC.json`) is told."""

    deployment_id: str
    name: str
    model_id: str = Field(description="what the user asked for (Hub id or folder)")
    model_path: str = Field(description="the local folder the weights are loaded from")
    revision: str | None = None
    sha: str | None = Field(None, description="the Hub commit the snapshot is of (None: a local folder)")
    task: str
    host: str
    port: int
    device: Device
    dtype: DType
    max_batch_size: int
    max_wait_ms: float
    max_input_tokens: int
    threads: int | None = None
    registry_path: str = Field(description="the deployments database the server reports its progress to")
