"""The quantize fan-out on prefect-dask's DaskTaskRunner, against a real `prefect server start`.

download -> merge -> convert -> quantize on the demo inputs with `performance.task_runner: dask` and
`performance.dask_processes: true`: a local Dask cluster of two worker *processes* runs the quantize
tasks. That is the hard case: the task, its parameters (Artifact records, Settings, paths) and its
result travel pickled, the content cache policy runs in the worker and reads the run's .cache folder,
and the workers reach the Prefect API on their own (a real server: the ephemeral API would be started
once per worker). Asserted from outside the flow: the workers that held each result are other
processes, the run record says so, the GGUFs exist and validate, the worker-side logs and progress
artifacts reached the server, and a second run is answered from the cache inside the workers.

Nothing is mocked. prefect-dask must be installed (`./setup.sh --test` does); without it the module
is skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.prefect_server import PrefectServer, serving, settled_task_runs

pytest.importorskip("prefect_dask", reason="prefect-dask is not installed (./setup.sh --test installs it)")

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

TYPES = ["Q8_0", "Q4_K_M"]
STAGES = ["download", "merge", "convert", "quantize"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> PrefectServer:
    with serving(tmp_path_factory.mktemp("prefect-server")) as srv:
        yield srv


def _dask_config(runs: Path):
    from flows.demo import demo_config

    cfg = demo_config(runs_dir=str(runs))
    cfg.performance.task_runner = "dask"
    cfg.performance.dask_processes = True
    cfg.performance.parallelism = 2
    cfg.quantization.types = list(TYPES)
    return cfg


def _run(cfg):
    from flows.full import full
    from flows.task_runners import configured_flow

    state = configured_flow(full, cfg)(config=cfg.model_dump(mode="json"), only=STAGES, return_state=True)
    assert state.is_completed(), state.message
    return state.state_details.flow_run_id, state.result()


def test_quantize_runs_on_dask_worker_processes(server: PrefectServer, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterTaskRunId,
        LogFilter,
        LogFilterTaskRunId,
    )

    from flows.task_runners import task_runner_for
    from tasks.gguf.validate import read_gguf, validate_gguf

    cfg = _dask_config(tmp_path / "runs")
    runner = task_runner_for(cfg)
    assert type(runner).__name__ == "DaskTaskRunner" and runner.cluster_kwargs["processes"] is True

    flow_run_id, summary = _run(cfg)

    # Where the quantize items ran: Dask workers in other processes, one result per type.
    info = summary.task_runners["quantize"]
    assert info["runner"] == "DaskTaskRunner" and info["cluster"] == "LocalCluster" and info["processes"] is True
    assert info["scheduler"].startswith("tcp://127.0.0.1:")
    assert len(info["items"]) == len(TYPES) and all(item["workers"] for item in info["items"]), info
    pids = {w["pid"] for w in info["workers"]}
    assert pids and None not in pids and os.getpid() not in pids, info["workers"]
    quant = next(s for s in summary.stages if s.stage == "quantize")
    assert quant.status == "done" and "on DaskTaskRunner (LocalCluster, processes" in quant.message

    # The files: made, intact, of the requested types, and recorded in the manifest with the runner note.
    manifest = json.loads(Path(summary.manifest).read_text())
    assert "on DaskTaskRunner" in manifest["stages"]["quantize"]["message"]
    f16 = Path(manifest["artifacts"]["gguf:F16"]["path"])
    reference = read_gguf(f16)
    for q in TYPES:
        rec = manifest["artifacts"][f"gguf:{q}"]
        assert rec["stage"] == "quantize" and rec["inputs"]["gguf:F16"] == manifest["artifacts"]["gguf:F16"]["sha256"]
        info_q = validate_gguf(Path(rec["path"]), quant=q, reference=reference)
        assert info_q["size"] == rec["size"] and rec["meta"]["quant"] == q

    # What the workers reported reached the server: task runs, the stage's log lines, progress artifacts.
    with get_client(sync_client=True) as client:
        runs = settled_task_runs(flow_run_id, ids=[item["task_run_id"] for item in info["items"]])
        qruns = [r for r in runs if r.name.startswith("quantize")]
        assert len(qruns) == len(TYPES) and all(r.state.is_completed() for r in qruns), [
            (r.name, r.state) for r in qruns
        ]
        assert {str(r.id) for r in qruns} == {item["task_run_id"] for item in info["items"]}
        ids = [r.id for r in qruns]
        logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=ids)))
        for q in TYPES:
            assert any(f"loraship-demo-{q}.gguf:" in entry.message for entry in logs), f"no worker log line for {q}"
        progress = client.read_artifacts(artifact_filter=ArtifactFilter(task_run_id=ArtifactFilterTaskRunId(any_=ids)))
        done = [a for a in progress if a.type == "progress" and float(a.data) >= 100.0]
        assert len({a.task_run_id for a in done}) == len(TYPES), [(a.task_run_id, a.type, a.data) for a in progress]

    # A second run: the cache policy runs inside the workers and answers from the run's .cache folder.
    _, again = _run(cfg)
    quant2 = next(s for s in again.stages if s.stage == "quantize")
    assert quant2.status == "cached", quant2
    assert again.task_runners["quantize"]["runner"] == "DaskTaskRunner"
