"""Orchestration against a real `prefect server start` (loopback, SQLite, basic auth), one per module.

- deployments/prefect.yaml deployed with the real `prefect deploy`, a real process worker, and a
  `training.completed` event POSTed over HTTP by `python -m deployments.notify`: a flow run of the
  triggered deployment is created with the event's values as parameters and completes on the demo inputs;
- a POST without (or with wrong) credentials is refused;
- continue_on_error: a failing non-critical stage gives a Completed, degraded run; a failing critical
  stage (or any stage without continue_on_error) fails it;
- notifications reach a local HTTP receiver through a saved CustomWebhookNotificationBlock;
- the heavy-stage global concurrency limit is held while a heavy stage runs, and a missing limit does
  not block.

The failing stage is a runner replaced in flows.stages.RUNNERS (a stand-in for a stage that breaks);
everything else is real.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest

from tests.prefect_server import PrefectServer, receiver, serving, stop

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> PrefectServer:
    with serving(tmp_path_factory.mktemp("prefect-server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import yaml

    from flows.demo import demo_inputs

    base, adapter = demo_inputs()
    # The triggered deployment's base config: it opts in to local sources and stage selections from the
    # event (off by default, see flows/triggered.py), the demo's adapter folder being the allowed root.
    trigger_config = tmp_path_factory.mktemp("trigger") / "base.yaml"
    trigger_config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "trigger-base"},
                "source": {"kind": "local", "path": str(adapter)},
                "trigger": {"allow_local": True, "allow_stage_selection": True, "allowed_roots": [str(adapter)]},
            }
        )
    )
    return {"base": base, "adapter": adapter, "runs": tmp_path_factory.mktemp("runs"), "trigger": trigger_config}


def _prefect(server: PrefectServer, *args: str, **env: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=ROOT,
        env=server.client_env(PWD=str(ROOT), **env),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _wait_final(client, flow_run_id, timeout: float = 240.0):
    """Poll until the flow run reaches a final state (a safety deadline, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        fr = client.read_flow_run(flow_run_id)
        if fr.state and fr.state.is_final():
            return fr
        if time.monotonic() > deadline:
            raise AssertionError(f"flow run {fr.name} still {fr.state.name if fr.state else None} after {timeout:.0f}s")
        time.sleep(1)


def test_event_triggers_deployed_flow_run(server: PrefectServer, demo: dict[str, Path], tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    from deployments import notify

    _prefect(server, "work-pool", "create", "loraship-process", "--type", "process")
    _prefect(server, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    with get_client(sync_client=True) as client:
        deps = {d.name: d for d in client.read_deployments()}
        assert {"loraship-full", "loraship-nightly-health", "loraship-on-training"} <= set(deps)
        nightly = deps["loraship-nightly-health"]
        assert [s.schedule.cron for s in nightly.schedules] == ["0 3 * * *"]
        assert nightly.parameters["only"] == ["serve", "health", "evaluate"]
        assert deps["loraship-on-training"].work_pool_name == "loraship-process"

    # Refused without credentials, and with wrong ones (the server's basic auth).
    event = notify.build_event("refused-model", str(demo["adapter"]))
    for auth in (None, "loraship-ci:wrong"):
        with pytest.raises(urllib.error.HTTPError) as err:
            notify.post_event(server.api_url, event, auth=auth)
        assert err.value.code == 401

    worker_log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "loraship-process", "--limit", "1"],
        cwd=ROOT,
        env=server.client_env(
            PREFECT_WORKER_QUERY_SECONDS="1",
            PREFECT_WORKER_PREFETCH_SECONDS="5",
            LORASHIP_RUNS_DIR=str(demo["runs"]),
            LORASHIP_TRIGGER_CONFIG=str(demo["trigger"]),
        ),
        stdout=worker_log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        sent = subprocess.run(
            [
                sys.executable,
                "-m",
                "deployments.notify",
                "--model",
                "trig-demo",
                "--path",
                str(demo["adapter"]),
                "--source-kind",
                "local",
                "--base-model",
                str(demo["base"]),
                "--only",
                "download",
            ],
            cwd=ROOT,
            env=server.client_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        assert "sent training.completed for trig-demo" in sent.stdout
        assert server.auth not in sent.stdout + sent.stderr

        dep_id = deps["loraship-on-training"].id
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 60
            runs = []
            while not runs and time.monotonic() < deadline:
                runs = client.read_flow_runs(
                    flow_run_filter=None, deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep_id]))
                )
                time.sleep(0.5)
            assert len(runs) == 1, "the training.completed event created no flow run of loraship-on-training"
            params = runs[0].parameters
            assert params["model_name"] == "trig-demo"
            assert params["path"] == str(demo["adapter"])
            assert params["source_kind"] == "local"
            assert params["base_model"] == str(demo["base"])
            assert params["only"] == "download"
            assert params["host"] == ""
            final = _wait_final(client, runs[0].id)
            assert final.state.is_completed(), (
                f"{final.state.name}: {final.state.message}\n{worker_log.read_text()[-4000:]}"
            )
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[runs[0].id]))
            )
            assert [c.state.name for c in children] == ["Completed"]
            assert {"model:trig-demo", "version:v1"} <= set(children[0].tags)
    finally:
        stop(worker)

    manifest = json.loads((demo["runs"] / "trig-demo" / "v1" / "manifest.json").read_text())
    assert manifest["stages"]["download"]["status"] == "done"
    assert (demo["runs"] / "trig-demo" / "v1" / "adapter" / "adapter_config.json").is_file()


def _demo_config(demo: dict[str, Path], name: str, **sections) -> dict:
    cfg = {
        "model": {"name": name, "version": "v1", "base_model": str(demo["base"])},
        "source": {"kind": "local", "path": str(demo["adapter"])},
        "pipeline": {"runs_dir": str(demo["runs"]), "stages": ["download", "merge", "space"]},
    }
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


@pytest.fixture()
def hooks(server: PrefectServer):
    """A receiver and two saved CustomWebhookNotificationBlocks pointing at it (one per event kind)."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    with receiver() as rec:
        for name in ("ci-hook", "ci-hook-2"):
            CustomWebhookNotificationBlock(
                name=name,
                url=rec.url,
                json_data={"subject": "{{subject}}", "text": "{{body}}", "via": "{{name}}"},
                headers={"X-Token": "{{token}}"},
                secrets={"token": "hook-secret-123"},
            ).save(name, overwrite=True)
        yield rec


def test_continue_on_error_degrades_and_notifies(
    server: PrefectServer, demo: dict[str, Path], hooks, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows import stages
    from flows.full import full

    def broken_space(ctx):
        raise RuntimeError("Space build failed (stand-in for a broken non-critical stage)")

    monkeypatch.setitem(stages.RUNNERS, "space", broken_space)
    cfg = _demo_config(
        demo,
        "coe-demo",
        pipeline={"continue_on_error": True},
        notifications={
            "on_completion": ["ci-hook"],
            "on_degraded": ["custom-webhook/ci-hook-2"],
            "on_failure": ["ci-hook"],
        },
    )
    state = full(config=cfg, only=["download", "space"], return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.degraded is True
    # the release gate runs whenever a publishing stage does; with no GGUFs (and no gate set) it skips
    assert {s.stage: s.status for s in summary.stages} == {"download": "done", "gate": "skipped", "space": "degraded"}
    manifest = json.loads(Path(summary.manifest).read_text())
    assert manifest["stages"]["space"]["status"] == "degraded"
    assert "Space build failed" in manifest["stages"]["space"]["message"]

    got = hooks.wait_for(2)
    assert len(got) == 2, got
    by_via = {r["json"]["via"]: r for r in got}
    assert set(by_via) == {"ci-hook", "ci-hook-2"}
    assert by_via["ci-hook"]["json"]["subject"] == "loraship: coe-demo v1 completed DEGRADED"
    text = by_via["ci-hook-2"]["json"]["text"]
    assert "- space: degraded (RuntimeError: Space build failed" in text
    assert f"manifest: {summary.manifest}" in text
    assert "/runs/flow-run/" in text  # a link to the run in the Prefect UI
    assert by_via["ci-hook"]["headers"]["X-Token"] == "hook-secret-123"  # secrets are filled in by the block


def test_failing_stages_fail_the_run(
    server: PrefectServer, demo: dict[str, Path], hooks, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows import stages
    from flows.full import full

    def broken(ctx):
        raise RuntimeError("broken stage")

    # A critical stage fails the run even with continue_on_error; the failure is notified.
    monkeypatch.setitem(stages.RUNNERS, "merge", broken)
    cfg = _demo_config(
        demo,
        "crit-demo",
        pipeline={"continue_on_error": True},
        notifications={"on_failure": ["ci-hook"], "on_completion": ["ci-hook-2"]},
    )
    state = full(config=cfg, only=["download", "merge", "space"], return_state=True)
    assert state.is_failed()
    manifest = json.loads((demo["runs"] / "crit-demo" / "v1" / "manifest.json").read_text())
    assert manifest["stages"]["merge"]["status"] == "failed"
    assert "space" not in manifest["stages"]
    got = hooks.wait_for(1)
    assert [r["json"]["via"] for r in got] == ["ci-hook"]
    assert got[0]["json"]["subject"] == "loraship: crit-demo v1 FAILED"
    assert "error: merge: RuntimeError: broken stage" in got[0]["json"]["text"]

    # A non-critical stage fails the run when continue_on_error is off.
    monkeypatch.setitem(stages.RUNNERS, "space", broken)
    cfg = _demo_config(demo, "strict-demo")
    state = full(config=cfg, only=["download", "space"], return_state=True)
    assert state.is_failed()


def test_a_bad_config_is_notified_before_any_stage(server: PrefectServer, demo: dict[str, Path], hooks) -> None:
    """A run that fails before its first stage (here a typo in the config) still sends its failure."""
    from flows.full import full

    cfg = _demo_config(demo, "typo-demo", notifications={"on_failure": ["ci-hook"]})
    cfg["quantization"] = {"typez": ["Q4_K_M"]}
    state = full(config=cfg, return_state=True)
    assert state.is_failed()
    got = hooks.wait_for(1)
    assert [r["json"]["via"] for r in got] == ["ci-hook"]
    assert got[0]["json"]["subject"] == "loraship: typo-demo v1 FAILED"
    text = got[0]["json"]["text"]
    assert "error: before the first stage: ConfigError" in text and "quantization.typez" in text
    assert not (demo["runs"] / "typo-demo").exists()  # nothing was created for the broken run


def test_heavy_stage_holds_global_concurrency_slot(
    server: PrefectServer, demo: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client

    from flows import stages
    from flows.full import full

    seen: dict[str, int] = {}

    def merge_probe(ctx):
        with get_client(sync_client=True) as client:
            seen["active"] = client.read_global_concurrency_limit_by_name("ci-heavy").active_slots
        return []

    monkeypatch.setitem(stages.RUNNERS, "merge", merge_probe)
    cfg = _demo_config(demo, "gcl-demo", performance={"concurrency_limit": "ci-heavy", "concurrency_slots": 1})
    assert full(config=cfg, only=["merge"], return_state=True).is_completed()
    assert seen["active"] == 1  # the run held the slot while merge ran
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name("ci-heavy")
    assert (limit.limit, limit.active_slots) == (1, 0)  # created on demand, released afterwards

    # A limit that does not exist is not waited for.
    cfg = _demo_config(demo, "gcl-missing", performance={"concurrency_limit": "no-such-limit"})
    assert full(config=cfg, only=["merge"], return_state=True).is_completed()


def test_served_deployment_runs_on_event(server: PrefectServer, demo: dict[str, Path], tmp_path: Path) -> None:
    """deployments/serve.py (no worker): the same trigger, served from one process."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from deployments import notify

    # The alternative to the worker setup: start from a server without the worker-run deployment of
    # the same name (serving onto an existing deployment keeps its work pool).
    with get_client(sync_client=True) as client:
        for d in client.read_deployments(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["loraship-on-training"]))
        ):
            client.delete_deployment(d.id)
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deployments.serve", "--deployment", "loraship-on-training"],
        cwd=ROOT,
        env=server.client_env(
            PREFECT_RUNNER_POLL_FREQUENCY="1",
            LORASHIP_RUNS_DIR=str(demo["runs"]),
            LORASHIP_TRIGGER_CONFIG=str(demo["trigger"]),
        ),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while "being served" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        notify.post_event(
            server.api_url,
            notify.build_event("served-demo", str(demo["adapter"]), source_kind="local", only="download"),
            auth=server.auth,
        )
        with get_client(sync_client=True) as client:
            (dep,) = client.read_deployments(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["loraship-on-training"]))
            )
            assert dep.work_pool_name is None  # served, not worker-run
            deadline = time.monotonic() + 60
            runs = []
            while not runs and time.monotonic() < deadline:
                runs = [
                    r
                    for r in client.read_flow_runs()
                    if r.deployment_id == dep.id and r.parameters.get("model_name") == "served-demo"
                ]
                time.sleep(0.5)
            assert len(runs) == 1, "no run of the served deployment for the event"
            final = _wait_final(client, runs[0].id)
            assert final.state.is_completed(), f"{final.state.name}: {final.state.message}\n{log.read_text()[-4000:]}"
    finally:
        stop(proc)
    assert (demo["runs"] / "served-demo" / "v1" / "adapter" / "adapter_config.json").is_file()


def test_several_models_run_as_parallel_flow_runs(server: PrefectServer, demo: dict[str, Path], tmp_path: Path) -> None:
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.multi import multi

    paths = []
    for name in ("multi-a", "multi-b"):
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(_demo_config(demo, name, pipeline={"stages": ["download"]})))
        paths.append(str(p))
    state = multi(config_paths=paths, parallel=2, return_state=True)
    assert state.is_completed(), state.message
    results = state.result()
    assert [(r["model"], r["state"]) for r in results] == [("multi-a", "Completed"), ("multi-b", "Completed")]
    with get_client(sync_client=True) as client:
        parent = client.read_flow_run(state.state_details.flow_run_id)
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id]))
        )
    assert sorted(t for c in children for t in c.tags if t.startswith("model:")) == ["model:multi-a", "model:multi-b"]
    for name in ("multi-a", "multi-b"):
        assert (demo["runs"] / name / "v1" / "adapter" / "adapter_config.json").is_file()
