"""The model API as Prefect flows: `model-api-deploy` (the six steps, a progress artifact in the UI) and
`model-api-stop`. The same parameters as `python -m flows.model_api deploy`; `deployments/prefect.yaml`
has a deployment for each, so a model can be deployed from the UI. Kept apart from flows/model_api.py so
the command line does not import Prefect (`list` and `status` answer at once).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from tasks.model_api.deploy import deploy, stop
from tasks.model_api.settings import DeployRequest, Device, DType


@flow(name="model-api-deploy", log_prints=True)
def model_api_deploy(
    model: str,
    name: str,
    task: str | None = None,
    port: int | None = None,
    device: Device = Device.AUTO,
    dtype: DType = DType.AUTO,
    revision: str | None = None,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    max_input_tokens: int = 512,
    download_timeout_s: float = 1800.0,
    host: str = "127.0.0.1",
) -> dict[str, Any]:
    """Deploy MODEL (Hub id, model folder or run folder) as NAME; returns the deployment (name, port, url, status).

    The server keeps running after the flow run ends; stop it with the model-api-stop flow or
    `python -m flows.model_api stop NAME`."""
    req = DeployRequest(
        model=model,
        name=name,
        task=task,
        port=port,
        device=device,
        dtype=dtype,
        revision=revision,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_input_tokens=max_input_tokens,
        download_timeout_s=download_timeout_s,
        host=host,
    )
    dep = deploy(req)  # the Progress inside makes the UI's progress artifact
    get_run_logger().info("%s (%s) ready at %s", dep.name, dep.task, dep.url)
    return dep.public()


@flow(name="model-api-stop", log_prints=True)
def model_api_stop(name: str) -> dict[str, Any]:
    """Stop the deployment NAME (its port is free again)."""
    return stop(name).public()
