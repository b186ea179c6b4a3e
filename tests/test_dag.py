"""The pipeline as a DAG, end to end: the demo model through every stage, again and again in one run folder.

Everything is real: the demo's tiny model and adapter, llama.cpp (convert, quantize, serve, health, eval),
the Hub-compatible server of tests/hub_server.py driven by the real huggingface_hub client, Prefect's test
API (the stages are task runs; their states and start/end times are read back from it), an LM Studio home
in a temporary folder (the desktop app cannot run here; its models folder is what the stage writes).

The tests run in file order on one run folder, each a new run of the flow after a change a user would make
(drop quant types, delete the repo, retrain, turn on the gate, ask for approval): that sequence of runs in
one folder is what they test. Each asserts what the run left on the Hub, in LM Studio, in the reports and
in the manifest.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest

from tests.prefect_server import settled_task_runs

pytestmark = [pytest.mark.slow, pytest.mark.prefect]

TOKEN_ENV = "LORASHIP_TEST_HUB_TOKEN"
REPO = "alice/dagdemo-GGUF"
SPACE = "alice/dagdemo-demo"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    from tests.hub_server import HubServer

    srv = HubServer(tmp_path_factory.mktemp("hub")).start()
    srv.state.add_token("hf_write_alice", "alice", "write")
    srv.state.add_token("hf_read_alice", "alice", "read")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, hub, prefect_api) -> dict[str, Any]:
    """The demo inputs (the adapter copied, so a test can retrain it) and a config builder."""
    from flows.demo import demo_inputs

    root = tmp_path_factory.mktemp("dag")
    base, adapter = demo_inputs()
    shutil.copytree(adapter, root / "adapter")
    return {"root": root, "base": base, "adapter": root / "adapter", "hub": hub}


def config(world: dict[str, Any], types: list[str], **pipeline: Any) -> dict[str, Any]:
    root = world["root"]
    return {
        "model": {"name": "dagdemo", "version": "v1", "base_model": str(world["base"])},
        "source": {"kind": "local", "path": str(world["adapter"])},
        "merge": {"base_model": str(world["base"])},
        "quantization": {"types": types},
        "hub": {"token": f"env:{TOKEN_ENV}", "endpoint": world["hub"].url, "include_adapter": False},
        "space": {"poll_interval": 0.05, "read_token": None, "smoke_test": False},  # no app runs here
        "deployment": {"lmstudio_home": str(root / "lmstudio"), "ollama_enabled": False, "lms_load": False},
        "serving": {"n_ctx": 256},
        "health_check": {"test_prompts": ["What color is the cat?"], "max_tokens": 8},
        "evaluation": {"max_tokens": 8, "n_ctx": 256},
        "pipeline": {"runs_dir": str(root / "runs"), **pipeline},
    }


def run(cfg: dict[str, Any], **kw: Any) -> tuple[Any, Any]:
    """One run of the flow; (state, summary)."""
    from flows.full import full

    state = full(config=cfg, return_state=True, **kw)
    assert state.is_completed(), state.message
    return state, state.result()


@pytest.fixture(scope="module")
def first(world: dict[str, Any]) -> dict[str, Any]:
    import os

    os.environ[TOKEN_ENV] = "hf_write_alice"
    state, summary = run(config(world, ["Q4_K_M", "Q5_K_M", "Q8_0"]))
    return {"state": state, "summary": summary}


def run_dir(world: dict[str, Any]) -> Path:
    return world["root"] / "runs" / "dagdemo" / "v1"


def manifest(world: dict[str, Any]) -> dict[str, Any]:
    return json.loads((run_dir(world) / "manifest.json").read_text())


def repo_files(world: dict[str, Any]) -> dict[str, Any]:
    return world["hub"].state.repo(REPO).files()


def repo_json(world: dict[str, Any], path: str) -> dict[str, Any]:
    hub = world["hub"]
    return json.loads(hub.state.blob(repo_files(world)[path].sha256))


def repo_text(world: dict[str, Any], path: str) -> str:
    return world["hub"].state.blob(repo_files(world)[path].sha256).decode()


def lmstudio_files(world: dict[str, Any]) -> set[str]:
    folder = world["root"] / "lmstudio" / "models" / "loraship" / "dagdemo-GGUF"
    return {p.name for p in folder.glob("*.gguf")}


def ggufs_in_repo(world: dict[str, Any]) -> set[str]:
    return {p for p in repo_files(world) if p.endswith(".gguf")}


def eval_quants(world: dict[str, Any]) -> dict[str, Any]:
    return json.loads((run_dir(world) / "reports" / "eval" / "eval.json").read_text())["quants"]


def task_runs(state: Any, stages: Collection[str]) -> dict[str, Any]:
    """The flow run's task runs by name, once the stage runs named have reached the server."""
    runs = settled_task_runs(state.state_details.flow_run_id, names=[f"stage:{s}" for s in stages])
    return {r.name: r for r in runs}


# --- the first run ------------------------------------------------------------------------------------


def test_a_normal_run_makes_one_commit_whose_card_carries_the_eval(world, first) -> None:
    repo = world["hub"].state.repo(REPO)
    loraship_commits = [c for c in repo.commits if c.message != "initial commit"]
    assert len(loraship_commits) == 1, [c.message for c in repo.commits]
    readme = repo_text(world, "README.md")
    table = eval_quants(world)
    assert "model-index" in readme
    for quant in ("Q4_K_M", "Q5_K_M", "Q8_0"):
        assert f"{table[quant]['ppl']:.4g}" in readme, f"{quant}'s perplexity is not in the pushed card"
    card = run_dir(world) / "reports" / "README.md"
    assert card.read_text() == readme  # the card stage found the Hub's README current: no second commit
    stages = {s.stage: s.status for s in first["summary"].stages}
    assert stages["hub_push"] == "done" and stages["gate"] == "done" and stages["space"] == "done"


def test_independent_stages_run_at_the_same_time(first) -> None:
    used = ("download", "merge", "quantize", "evaluate", "serve", "health", "local_deploy", "gate", "hub_push")
    runs = task_runs(first["state"], used)
    stage_runs = {name.removeprefix("stage:"): r for name, r in runs.items() if name.startswith("stage:")}
    assert {"download", "quantize", "evaluate", "serve", "health", "hub_push"} <= set(stage_runs)

    def span(name: str) -> tuple[float, float]:
        r = stage_runs[name]
        return r.start_time.timestamp(), r.end_time.timestamp()

    e0, e1 = span("evaluate")
    overlapping = [s for s in ("serve", "health", "local_deploy") if span(s)[0] < e1 and span(s)[1] > e0]
    assert overlapping, "evaluate ran alone: " + str({s: span(s) for s in ("evaluate", "serve", "health")})
    # the graph the UI draws: each stage's task run waits for its upstream stages' task runs
    ids = {name: r.id for name, r in stage_runs.items()}
    waits = {w.id for w in stage_runs["hub_push"].task_inputs.get("wait_for", [])}
    assert {ids["gate"], ids["evaluate"]} <= waits
    assert {w.id for w in stage_runs["merge"].task_inputs.get("wait_for", [])} == {ids["download"]}


# --- runs after a change ------------------------------------------------------------------------------


def test_a_repo_deleted_on_the_hub_is_pushed_again(world, first) -> None:
    hub = world["hub"]
    before = {p: f.sha256 for p, f in repo_files(world).items()}
    del hub.state.repos[("model", REPO)]
    _, summary = run(config(world, ["Q4_K_M", "Q5_K_M", "Q8_0"]))
    status = {s.stage: s.status for s in summary.stages}
    assert status["hub_push"] == "done" and status["card"] == "done"
    after = {p: f.sha256 for p, f in repo_files(world).items()}
    assert after == before  # the same files, pushed again in one commit
    assert len([c for c in hub.state.repo(REPO).commits if c.message != "initial commit"]) == 1
    # and a run with nothing changed makes no commit at all
    _, summary = run(config(world, ["Q4_K_M", "Q5_K_M", "Q8_0"]))
    assert len(hub.state.repo(REPO).commits) == 2
    assert "no commit" in {s.stage: s.message for s in summary.stages}["hub_push"]


def test_dropped_quant_types_leave_every_place_they_were_put(world, first) -> None:
    commits = len(world["hub"].state.repo(REPO).commits)
    _, summary = run(config(world, ["Q4_K_M"]))
    assert lmstudio_files(world) == {"dagdemo-Q4_K_M.gguf"}
    assert set(eval_quants(world)) == {"F16", "Q4_K_M"}
    card = (run_dir(world) / "reports" / "README.md").read_text()
    assert "Q5_K_M" not in card and "Q8_0" not in card
    assert ggufs_in_repo(world) == {"dagdemo-F16.gguf", "dagdemo-Q4_K_M.gguf"}
    published = repo_json(world, "loraship.json")
    assert {n for n in published["artifacts"] if n.startswith("gguf:")} == {"gguf:F16", "gguf:Q4_K_M"}
    assert "dagdemo-Q8_0.gguf" not in published["published_files"]
    assert len(world["hub"].state.repo(REPO).commits) == commits + 1  # added and removed in one commit
    m = manifest(world)
    assert {"gguf:Q5_K_M", "gguf:Q8_0"} <= set(m["superseded"]) and "gguf:Q8_0" not in m["artifacts"]
    assert "quantization.types no longer lists Q8_0" in m["superseded"]["gguf:Q8_0"]["reason"]
    assert (run_dir(world) / "gguf" / "dagdemo-Q8_0.gguf").exists()  # pipeline.cleanup decides about files
    assert "gguf:Q8_0" in summary.superseded


def test_the_nightly_health_run_takes_only_the_current_lineage(world, first) -> None:
    """--only serve health evaluate: quantize does not run; its dropped types stay superseded."""
    _, summary = run(config(world, ["Q4_K_M"]), only=["serve", "health", "evaluate"])
    assert [s.stage for s in summary.stages] == ["serve", "health", "evaluate"]
    assert set(eval_quants(world)) == {"F16", "Q4_K_M"}
    assert "gguf:Q5_K_M" in manifest(world)["superseded"]


def test_the_gate_withholds_a_quantization_over_its_kl_limit(world, first) -> None:
    from flows.notifications import compose

    table = eval_quants(world)
    assert table["Q4_K_M"]["kl_div"] > 0.005  # the demo's Q4_K_M is far from its F16; Q8_0 is close
    gate = {"max_kl_div": 0.005, "require_healthy": True}
    _, summary = run(config(world, ["Q4_K_M", "Q8_0"], gate=gate))
    assert summary.gate["passed"] == ["F16", "Q8_0"] or set(summary.gate["passed"]) == {"F16", "Q8_0"}
    assert "KL" in summary.gate["withheld"]["Q4_K_M"] and "max_kl_div 0.005" in summary.gate["withheld"]["Q4_K_M"]
    assert ggufs_in_repo(world) == {"dagdemo-F16.gguf", "dagdemo-Q8_0.gguf"}
    assert lmstudio_files(world) == {"dagdemo-Q8_0.gguf"}
    space = world["hub"].state.repo(SPACE, "space")
    assert space.variables["MODEL_FILE"]["value"] == "dagdemo-Q8_0.gguf"  # space.quant Q4_K_M was withheld
    assert "withheld Q4_K_M" in {s.stage: s.message for s in summary.stages}["gate"]
    assert manifest(world)["artifacts"]["report:gate"]["meta"]["withheld"]["Q4_K_M"]
    subject, body = compose(summary, "completed")
    assert "release gate: ships F16, Q8_0; withheld Q4_K_M" in body


def test_when_nothing_passes_the_gate_publishing_is_skipped(world, first) -> None:
    commits = len(world["hub"].state.repo(REPO).commits)
    _, summary = run(config(world, ["Q4_K_M"], gate={"max_kl_div": 0.005}))
    status = {s.stage: (s.status, s.message) for s in summary.stages}
    for stage in ("hub_push", "card", "space", "local_deploy"):
        assert status[stage][0] == "skipped", (stage, status[stage])
        assert "release gate withheld every quantization" in status[stage][1]
    assert len(world["hub"].state.repo(REPO).commits) == commits
    assert summary.gate["blocked"]


def test_a_retrained_adapter_recomputes_everything_downstream_and_publishes_nothing_old(world, first) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    m = manifest(world)
    before = {**{n: s["artifact"] for n, s in m["superseded"].items()}, **m["artifacts"]}
    weights = world["adapter"] / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: (v * 1.5 if "lora_B" in k else v) for k, v in tensors.items()}, weights)  # "trained more"
    assert any(torch.count_nonzero(v) for k, v in tensors.items() if "lora_B" in k)
    _, summary = run(config(world, ["Q4_K_M", "Q8_0"]))
    now = manifest(world)["artifacts"]
    for name in ("adapter", "merged", "gguf:F16", "gguf:Q4_K_M", "gguf:Q8_0", "report:eval"):
        assert now[name]["sha256"] != before[name]["sha256"], f"{name} was not recomputed"
    published = repo_json(world, "loraship.json")["artifacts"]
    for name in ("gguf:F16", "gguf:Q4_K_M", "gguf:Q8_0"):
        assert published[name]["sha256"] == now[name]["sha256"]
    pushed = now["publish:hub"]["inputs"]
    assert pushed["report:eval"] == now["report:eval"]["sha256"]  # the card was made from this run's eval
    readme = repo_text(world, "README.md")
    table = eval_quants(world)
    assert f"{table['Q4_K_M']['ppl']:.4g}" in readme
    # nothing current was made from anything that is not current
    for a in now.values():
        for name, digest in a["inputs"].items():
            if name in now:
                assert now[name]["sha256"] == digest, f"{a['name']} was made from an old {name}"


def _run_in_thread(cfg: dict[str, Any]) -> tuple[threading.Thread, list[Any]]:
    from flows.full import full

    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(full(config=cfg, return_state=True)), daemon=True)
    t.start()
    return t, box


def _paused_run(thread: threading.Thread, timeout: float = 300) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert thread.is_alive(), "the flow ended without pausing"
            paused = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
                )
            )
            if paused:
                return paused[0]
            time.sleep(0.5)
    raise AssertionError("the flow never paused for approval")


@pytest.mark.parametrize("approve", [False, True], ids=["rejected", "approved"])
def test_an_approval_pause_resumed_through_the_api(world, first, approve: bool) -> None:
    from prefect.client.orchestration import get_client

    before = ggufs_in_repo(world)
    commits = len(world["hub"].state.repo(REPO).commits)
    thread, box = _run_in_thread(config(world, ["Q4_K_M", "Q5_K_M", "Q8_0"], approval=True))
    fr = _paused_run(thread)
    with get_client(sync_client=True) as client:
        keyset = fr.state.state_details.run_input_keyset
        form = client.read_flow_run_input(flow_run_id=fr.id, key=keyset["description"])
        assert "Q5_K_M" in form and "kl_div" in form  # the reviewer sees the eval table
        client.resume_flow_run(fr.id, run_input={"approve": approve, "reviewer": "qa", "note": "checked"})
    thread.join(timeout=600)
    assert box and box[0].is_completed(), box
    summary = box[0].result()
    status = {s.stage: s.status for s in summary.stages}
    assert summary.gate["approval"]["reviewer"] == "qa"
    if approve:
        assert status["hub_push"] == "done"
        assert ggufs_in_repo(world) == before | {"dagdemo-Q5_K_M.gguf"}
        assert len(world["hub"].state.repo(REPO).commits) == commits + 1
    else:
        assert status["hub_push"] == "skipped" and status["local_deploy"] == "skipped"
        assert ggufs_in_repo(world) == before and len(world["hub"].state.repo(REPO).commits) == commits
        assert "not approved" in summary.gate["blocked"]
