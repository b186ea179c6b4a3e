"""The model API as a Prefect flow: deploy with a progress artifact in the UI, then stop."""

from __future__ import annotations

import asyncio

import pytest
import requests

from tasks.model_api.registry import DeploymentRegistry, Status
from tasks.support.tiny_task_models import tiny_bert

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


async def _progress_artifacts(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["progress"])
            )
        )


def test_flow_deploys_with_a_progress_artifact_and_stops(prefect_api, tmp_path, monkeypatch):
    from flows.model_api_flow import model_api_deploy, model_api_stop

    monkeypatch.setenv("LORASHIP_HOME", str(tmp_path / "home"))
    state = model_api_deploy(model=str(tiny_bert("token-classification")), name="from-ui", return_state=True)
    out = state.result()
    try:
        assert out["status"] == "ready" and out["task"] == "token-classification" and out["url"]
        r = requests.post(f"{out['url']}/predict", json={"text": "Ada lived in London"}, timeout=30)
        assert r.status_code == 200
        (artifact,) = asyncio.run(_progress_artifacts(state.state_details.flow_run_id))
        assert artifact.data == pytest.approx(100.0) and "deploy from-ui" in (artifact.description or "")
    finally:
        stopped = model_api_stop(name="from-ui")
    assert stopped["status"] == "stopped"
    assert DeploymentRegistry().latest("from-ui").status == Status.STOPPED
