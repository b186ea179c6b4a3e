"""The transformers engine: the run's merged/ model as a model API deployment (tasks/model_api/).

It serves the merged HF model itself (no GGUF), as `python -m flows.model_api deploy merged/` would:
text-generation on /predict with dynamic batching, /health, /info, /docs, recorded in the deployments
registry (so `python -m flows.model_api list/stop` see it too). It has no OpenAI-compatible routes: the
health stage checks it through the model API's own /health, /info and /predict (`health_checks`). The
deployment is named `serving.transformers_name`, else `<model>-<version>` of the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_write_json
from tasks.core.errors import PermanentError
from tasks.core.vocab import ArtifactKind, Stage

if TYPE_CHECKING:
    from tasks.evaluate.health import HealthSettings
    from tasks.serve.stage import ServeSettings


def deployment_name(merged: Artifact, settings: ServeSettings) -> str:
    """`serving.transformers_name`, else the run folder's <model>-<version> (runs/<model>/<version>/merged)."""
    if settings.transformers_name:
        return settings.transformers_name
    run = merged.local_path.parent
    return f"{run.parent.name}-{run.name}"


@dataclass(frozen=True)
class TransformersEngine:
    name: str = "transformers"
    description: str = "the merged model behind the model API (/predict, /health, /info, /docs), dynamic batching"
    takes: ArtifactKind = ArtifactKind.MERGED
    openai_compatible: bool = False

    def start(self, inputs: list[Artifact], settings: ServeSettings, state_dir: Path) -> list[Artifact]:
        from tasks.model_api.deploy import deploy
        from tasks.model_api.settings import DeployRequest

        merged = next((a for a in inputs if a.kind == ArtifactKind.MERGED), None)
        if merged is None or not merged.local_path.is_dir():
            raise PermanentError("serving.engine transformers serves merged/, and this run has none", hint="run merge")
        name = deployment_name(merged, settings)
        dep = deploy(
            DeployRequest(
                model=str(merged.local_path),
                name=name,
                task=None,  # inferred from the model (pipeline_tag, architectures): speech models serve ASR
                host=settings.host,
                port_range=settings.port_range,
                threads=settings.threads,
                start_timeout_s=settings.start_timeout_s,
            )
        )
        record = {**dep.public(), "base_url": dep.url, "engine": self.name, "keep": settings.keep_running}
        path = atomic_write_json(state_dir / "serve-transformers.json", record)
        meta = {
            "pid": dep.pid,
            "port": dep.port,
            "base_url": dep.url,
            "url": dep.url,
            "model_id": name,
            "quant": "merged",
            "log": dep.log_path,
            "engine": self.name,
            "deployment": name,
        }
        return [
            Artifact.from_path(
                path,
                name="serve:transformers",
                kind=ArtifactKind.SERVICE,
                stage=Stage.SERVE,
                inputs=[merged],
                settings=settings,
                meta=meta,
            )
        ]

    def stop(self, records: list[Artifact], timeout: float) -> None:
        from tasks.model_api.deploy import stop

        for r in records:
            try:
                stop(r.meta["deployment"], timeout=timeout)
            except PermanentError:  # already stopped (by hand, or killed)
                pass

    def keep(self, records: list[Artifact]) -> None:
        """Nothing to do: a deployment's server runs in its own session and outlives the flow anyway."""

    def health_checks(
        self, base_url: str, model_id: str | None, settings: HealthSettings, headers: dict[str, str]
    ) -> tuple[list[dict[str, Any]], str | None]:
        """The model API: /health ready, /info's task, /predict with an input fitting the task (a WAV for speech)."""
        from tasks.evaluate.health import model_api_checks

        return model_api_checks(base_url, model_id, settings, headers)
