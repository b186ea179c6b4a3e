"""Cost and runtime controls against the local Hub server with the real huggingface_hub client: the Storage
Bucket at /data with HF_HOME there, duplicate_from, the embed URL, and the idle schedule's flow (pause or
downgrade after N idle hours, read from the Space's run log)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import yaml

from tasks.core.errors import PermanentError
from tasks.publish.hub_io import space_embed_url as embed_url
from tasks.publish.space import SpaceSettings, space
from tasks.publish.space_costs import check_idle, idle_decision, last_activity
from tests import test_space
from tests.test_space import FAST, READ, WRITE

pushed = test_space.pushed  # the fixture: a GGUF repo pushed to the test Hub

NOW = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)


def _deploy(tmp_path, repo_record, **kw):
    art, ggufs = repo_record
    return space(
        art,
        ggufs,
        SpaceSettings(**{**FAST, **kw}),
        tmp_path / "publish",
        model_name="tiny",
        token=WRITE,
        read_token=READ,
        sleep=lambda s: None,
    )


def test_storage_bucket_is_mounted_at_data_with_the_model_cache_there(tmp_path, hub_server, pushed):
    made = _deploy(tmp_path, pushed, storage="bucket", hardware="cpu-upgrade")
    repo = hub_server.state.repo("alice/tiny-demo", "space")
    assert hub_server.state.buckets == {"alice/tiny-demo-storage": {"private": True}}
    assert repo.volumes == [{"type": "bucket", "source": "alice/tiny-demo-storage", "mountPath": "/data"}]
    assert repo.variables["HF_HOME"]["value"] == "/data/.huggingface"
    assert made.meta["storage"] == "bucket" and made.meta["storage_changed"] is True
    # unchanged on the Space: the next run mounts nothing
    before = len(hub_server.state.calls("PUT", r"/volumes$"))
    again = _deploy(tmp_path, pushed, storage="bucket", hardware="cpu-upgrade")
    assert again.meta["storage_changed"] is False and len(hub_server.state.calls("PUT", r"/volumes$")) == before
    # compared with the Space, not with a record: volumes removed there are mounted again, others kept
    repo.volumes = [{"type": "model", "source": "alice/other", "mountPath": "/models", "readOnly": True}]
    third = _deploy(tmp_path, pushed, storage="bucket", hardware="cpu-upgrade")
    assert third.meta["storage_changed"] is True and len(repo.volumes) == 2
    assert {"type": "bucket", "source": "alice/tiny-demo-storage", "mountPath": "/data"} in repo.volumes


def test_without_storage_no_bucket_and_no_hf_home(tmp_path, hub_server, pushed):
    made = _deploy(tmp_path, pushed)
    repo = hub_server.state.repo("alice/tiny-demo", "space")
    assert not hub_server.state.buckets and repo.volumes is None and "HF_HOME" not in repo.variables
    assert made.meta["storage"] == "none"


def _source_space(hub_server) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_server.url, token="hf_write_alice")
    api.create_repo("alice/my-template", repo_type="space", space_sdk="gradio")
    api.upload_file(
        path_or_fileobj=b"print('my own app')\n", path_in_repo="app.py", repo_id="alice/my-template", repo_type="space"
    )


def test_duplicate_from_copies_once_then_only_configures(tmp_path, hub_server, pushed):
    _source_space(hub_server)
    made = _deploy(tmp_path, pushed, duplicate_from="alice/my-template", hardware="t4-small", storage="bucket")
    repo = hub_server.state.repo("alice/tiny-demo", "space")
    assert repo.duplicated_from == "alice/my-template"
    assert hub_server.state.blob(repo.files()["app.py"].sha256) == b"print('my own app')\n", "the Space's own app"
    assert repo.requested_hardware == "t4-small" and repo.variables["MODEL_FILE"]["value"] == "tiny-Q4_K_M.gguf"
    assert repo.secrets["HF_TOKEN"]["value"] == "hf_read_alice" and repo.volumes[0]["mountPath"] == "/data"
    assert made.meta["duplicate_from"] == "alice/my-template" and made.meta["commit"] is None
    commits = len(repo.commits)
    _deploy(tmp_path, pushed, duplicate_from="alice/my-template", hardware="t4-small", storage="bucket")
    assert len(hub_server.state.calls("POST", r"/duplicate$")) == 1 and len(repo.commits) == commits


def test_duplicate_from_a_missing_space_is_a_clear_error(tmp_path, hub_server, pushed):
    with pytest.raises(PermanentError, match="space.duplicate_from 'alice/nope': no such Space"):
        _deploy(tmp_path, pushed, duplicate_from="alice/nope")


def test_embed_url():
    assert embed_url("Alice/My_demo.v2", "https://huggingface.co") == "https://alice-my-demo-v2.hf.space"
    assert embed_url("alice/demo", "http://127.0.0.1:9") == "http://127.0.0.1:9/spaces/alice/demo"


def _log(hours_ago: float) -> str:
    return f"loraship: activity {(NOW - timedelta(hours=hours_ago)).strftime('%Y-%m-%dT%H:%M:%SZ')}"


def test_idle_decisions():
    s = SpaceSettings(idle_hours=2, hardware="t4-small")
    startup = "===== Application Startup at 2026-12-02 06:00:00 ====="
    assert last_activity([startup, _log(3), "other", _log(5)]) == NOW - timedelta(hours=3)
    assert idle_decision("RUNNING", "t4-small", [startup, _log(3)], s, NOW).action == "pause"
    assert idle_decision("RUNNING", "t4-small", [startup, _log(1)], s, NOW).action == "none"
    assert idle_decision("RUNNING", "t4-small", [startup], s, NOW).idle_hours == 6
    assert "no activity" in idle_decision("RUNNING", "t4-small", ["x"], s, NOW).reason
    assert idle_decision("SLEEPING", "t4-small", [_log(9)], s, NOW).action == "none"
    assert idle_decision("RUNNING", "cpu-basic", [_log(9)], s, NOW).action == "none"
    down = s.model_copy(update={"idle_action": "downgrade", "idle_downgrade_to": "cpu-upgrade"})
    assert idle_decision("RUNNING", "t4-small", [_log(9)], down, NOW).action == "downgrade"
    assert idle_decision("RUNNING", "cpu-upgrade", [_log(9)], down, NOW).action == "none"
    assert idle_decision("RUNNING", "t4-small", [_log(9)], SpaceSettings(), NOW).action == "none"


def test_check_idle_pauses_and_downgrades_on_the_hub(tmp_path, hub_server, pushed):
    from huggingface_hub import HfApi

    _deploy(tmp_path, pushed, hardware="t4-small")
    repo = hub_server.state.repo("alice/tiny-demo", "space")
    api = HfApi(endpoint=hub_server.url, token="hf_write_alice")
    hub_server.state.run_logs["alice/tiny-demo"] = [("2026-01-01T00:00:00Z", _log(5))]
    s = SpaceSettings(idle_hours=4, hardware="t4-small")
    dry = check_idle(api, "alice/tiny-demo", s, now=NOW, apply=False)
    assert dry["action"] == "pause", dry
    assert repo.stage == "RUNNING", "a dry check changes nothing"
    rec = check_idle(api, "alice/tiny-demo", s, now=NOW)
    assert rec["applied"] and repo.stage == "PAUSED" and rec["idle_hours"] == pytest.approx(5)
    repo.stage = "RUNNING"
    down = s.model_copy(update={"idle_action": "downgrade"})
    assert check_idle(api, "alice/tiny-demo", down, now=NOW)["action"] == "downgrade"
    assert repo.requested_hardware == "cpu-basic"
    hub_server.state.run_logs["alice/tiny-demo"] = [("2026-01-01T00:00:00Z", _log(0.5))]
    repo.requested_hardware = "t4-small"
    assert check_idle(api, "alice/tiny-demo", s, now=NOW)["action"] == "none" and repo.stage == "RUNNING"


def test_the_idle_flow_from_a_config_file(tmp_path, hub_server, pushed, monkeypatch):
    from flows.space_idle import space_idle

    _deploy(tmp_path, pushed, hardware="a10g-small")
    repo = hub_server.state.repo("alice/tiny-demo", "space")
    hub_server.state.run_logs["alice/tiny-demo"] = [("2020-01-01T00:00:00Z", "loraship: activity 2020-01-01T00:00:00Z")]
    monkeypatch.setenv("LORASHIP_TEST_HF_TOKEN", "hf_write_alice")
    cfg = tmp_path / "deployment_config.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "tiny", "base_model": "x/y"},
                "source": {"kind": "local", "path": str(tmp_path)},
                "hub": {"endpoint": hub_server.url, "token": "env:LORASHIP_TEST_HF_TOKEN"},
                "space": {"idle_hours": 1, "idle_action": "pause"},
            }
        )
    )
    record = space_idle.fn(str(cfg))
    assert record["space_id"] == "alice/tiny-demo" and record["applied"] and repo.stage == "PAUSED"


def test_the_idle_deployment_is_scheduled_hourly():
    from deployments.serve import PREFECT_YAML, build_deployments

    spec = {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}["loraship-space-idle"]
    assert spec["entrypoint"] == "flows/space_idle.py:space_idle" and spec["schedules"][0]["cron"] == "17 * * * *"
    (served,) = build_deployments(names=["loraship-space-idle"], cron="0 1 * * *")
    assert [s.schedule.cron for s in served.schedules] == ["17 * * * *"], "--cron is the nightly deployment's"
