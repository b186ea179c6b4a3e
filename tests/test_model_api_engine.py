"""The serve stage's engines registry: `serving.engine: transformers` serves merged/ through the model API."""

from __future__ import annotations

import pytest
import requests
from pydantic import ValidationError

from tasks.core.artifacts import Artifact
from tasks.core.vocab import ArtifactKind
from tasks.model_api.registry import DeploymentRegistry, Status
from tasks.serve.engines import SERVE_ENGINES
from tasks.serve.stage import ServeSettings
from tasks.support.tiny_models import copy_tree
from tasks.support.tiny_task_models import tiny_causal_lm


def test_engines_registry_and_settings():
    assert SERVE_ENGINES.names() == ("llama_cpp", "transformers")
    assert ServeSettings().engine == "llama_cpp"
    with pytest.raises(ValidationError, match="unknown serve engine 'transformer'.*did you mean 'transformers'"):
        ServeSettings(engine="transformer")
    for e in SERVE_ENGINES.values():
        assert e.description and e.takes in (ArtifactKind.GGUF, ArtifactKind.MERGED)
    assert SERVE_ENGINES["llama_cpp"].openai_compatible and not SERVE_ENGINES["transformers"].openai_compatible


@pytest.mark.slow
def test_transformers_engine_serves_merged(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASHIP_HOME", str(tmp_path / "home"))
    merged_dir = copy_tree(tiny_causal_lm(), tmp_path / "runs" / "demo" / "v3" / "merged")
    merged = Artifact.from_path(merged_dir, name="merged", kind=ArtifactKind.MERGED, stage="merge")
    settings = ServeSettings(engine="transformers", threads=1)
    engine = SERVE_ENGINES[settings.engine]
    (rec,) = engine.start([merged], settings, tmp_path / "reports")
    try:
        assert rec.name == "serve:transformers" and rec.kind == ArtifactKind.SERVICE
        assert rec.meta["deployment"] == "demo-v3" and rec.inputs == {"merged": merged.sha256}
        assert (tmp_path / "reports" / "serve-transformers.json").is_file()
        r = requests.post(f"{rec.meta['url']}/predict", json={"text": "Once", "parameters": {"max_new_tokens": 3}})
        assert r.status_code == 200 and "generated_text" in r.json()["result"]
        assert requests.get(f"{rec.meta['url']}/info", timeout=10).json()["task"] == "text-generation"
        assert [d.name for d in DeploymentRegistry().list()] == ["demo-v3"]  # `flows.model_api list` sees it
    finally:
        engine.stop([rec], 10)
    assert DeploymentRegistry().latest("demo-v3").status == Status.STOPPED
