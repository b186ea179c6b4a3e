"""The contract of a serve engine: what the serve stage runs its servers with.

An engine names the artifact kind it serves (`takes`: GGUF files for llama.cpp, the merged folder for
transformers), starts one server per artifact it picks and returns their `serve:*` service records
(`start`), and stops them (`stop`). `openai_compatible` tells the stages that talk to a server (health,
template contract) whether `/v1` routes are there. Adding an engine is one module with one object
registered in tasks/serve/engines/__init__.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from tasks.core.artifacts import Artifact
from tasks.core.vocab import ArtifactKind

if TYPE_CHECKING:
    from tasks.serve.stage import ServeSettings


@runtime_checkable  # the registry checks its entries against it (tasks/core/registry.py Contract)
class ServeEngine(Protocol):
    name: str
    description: str
    takes: ArtifactKind
    openai_compatible: bool

    def start(self, inputs: list[Artifact], settings: ServeSettings, state_dir: Path) -> list[Artifact]:
        """Start the servers; one `serve:<...>` record (kind service) each, meta with pid, port, url, base_url."""
        ...

    def stop(self, records: list[Artifact], timeout: float) -> None: ...

    def keep(self, records: list[Artifact]) -> None:
        """Leave these running when this process exits (serving.keep_running)."""
        ...
