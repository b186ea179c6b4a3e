"""The llama.cpp engine: GGUFs behind llama-cpp-python's OpenAI-compatible server (tasks/serve/stage.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.artifacts import Artifact
from tasks.core.vocab import ArtifactKind

if TYPE_CHECKING:
    from tasks.evaluate.health import HealthSettings
    from tasks.serve.stage import ServeSettings


@dataclass(frozen=True)
class LlamaCppEngine:
    name: str = "llama_cpp"
    description: str = "GGUF quants on llama-cpp-python's OpenAI-compatible server, one process per quant"
    takes: ArtifactKind = ArtifactKind.GGUF
    openai_compatible: bool = True

    def start(self, inputs: list[Artifact], settings: ServeSettings, state_dir: Path) -> list[Artifact]:
        from tasks.serve.stage import serve

        return serve(inputs, settings, state_dir)

    def stop(self, records: list[Artifact], timeout: float) -> None:
        from tasks.serve.stage import stop_servers

        stop_servers(records, timeout)

    def keep(self, records: list[Artifact]) -> None:
        from tasks.serve.stage import keep

        keep([a.meta["pid"] for a in records])

    def health_checks(
        self, base_url: str, model_id: str | None, settings: HealthSettings, headers: dict[str, str]
    ) -> tuple[list[dict[str, Any]], str | None]:
        """OpenAI's API: /v1/models lists the model, each test prompt gets a chat completion."""
        from tasks.evaluate.health import openai_checks

        return openai_checks(base_url, model_id, settings, headers)
