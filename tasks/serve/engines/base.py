"""The contract of a serve engine: what the serve stage runs its servers with.

An engine names the artifact kind it serves (`takes`: GGUF files for llama.cpp, the merged folder for
transformers), starts one server per artifact it picks and returns their `serve:*` service records
(`start`), and stops them (`stop`). It also says how its servers are health-checked (`health_checks`:
the health stage asks the engine that started a server, so a new engine brings its own protocol).
`openai_compatible` tells the stages that talk to a server (template contract) whether `/v1` routes are
there. Adding an engine is one module with one object registered in tasks/serve/engines/__init__.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from tasks.core.artifacts import Artifact
from tasks.core.vocab import ArtifactKind

if TYPE_CHECKING:
    from tasks.evaluate.health import HealthSettings
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

    def health_checks(
        self, base_url: str, model_id: str | None, settings: HealthSettings, headers: dict[str, str]
    ) -> tuple[list[dict[str, Any]], str | None]:
        """The api and model checks of one of its servers (tasks/evaluate/health.py check records), and the
        model id they found (None: the server cannot be used)."""
        ...
