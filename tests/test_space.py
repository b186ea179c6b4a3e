"""Space deploy against the local Hub server: files, variables, the read token as a secret only, runtime sequences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from tasks.core.errors import PermanentError
from tasks.publish.card import CardSettings
from tasks.publish.hub_push import HubSettings, hub_push
from tasks.publish.space import SpaceSettings, space
from tests.hub_fixtures import gguf_artifacts

WRITE, READ = SecretStr("hf_write_alice"), SecretStr("hf_read_alice")
FAST = dict(poll_interval=0.01, timeout=60, smoke_test=False)  # the smoke test has its own tests (an app runs)


@pytest.fixture
def pushed(tmp_path, hub_server):
    ggufs = gguf_artifacts(tmp_path / "g")
    art = hub_push(
        ggufs,
        HubSettings(endpoint=hub_server.url, private=True),
        CardSettings(),
        tmp_path / "publish",
        tmp_path / "reports",
        model_name="tiny",
        version="v1",
        token=WRITE,
    )
    return art, ggufs


def _deploy(tmp_path, pushed, token=WRITE, read=READ, **kw):
    art, ggufs = pushed
    return space(
        art,
        ggufs,
        SpaceSettings(**{**FAST, **kw}),
        tmp_path / "publish",
        model_name="tiny",
        token=token,
        read_token=read,
        sleep=lambda s: None,
    )


def test_deploy_sets_variables_and_the_read_token_as_secret_only(tmp_path, hub_server, pushed):
    made = _deploy(tmp_path, pushed, hardware="cpu-upgrade", sleep_time=3600)
    repo = hub_server.state.repo("alice/tiny-demo", "space")
    assert repo.sdk == "gradio" and made.meta["stage"] == "RUNNING"
    assert {"app.py", "loraship_space.py", "requirements.txt", "README.md"} <= set(repo.files())
    header = yaml.safe_load(hub_server.state.blob(repo.files()["README.md"].sha256).decode().split("---")[1])
    assert (
        header["sdk"] == "gradio"
        and header["app_file"] == "app.py"
        and header["models"] == ["alice/tiny-GGUF"]
        and header["sdk_version"]
    )
    variables = {k: v["value"] for k, v in repo.variables.items()}
    assert variables["MODEL_REPO"] == "alice/tiny-GGUF" and variables["MODEL_FILE"] == "tiny-Q4_K_M.gguf"
    assert json.loads(variables["EXAMPLES"]) and variables["RATE_LIMIT_PER_MINUTE"] == "10"
    # the read token is the HF_TOKEN secret, and nowhere else
    assert repo.secrets["HF_TOKEN"]["value"] == "hf_read_alice"
    assert list(repo.secrets) == ["HF_TOKEN"]
    for v in variables.values():
        assert "hf_read_alice" not in v and "hf_write_alice" not in v
    for f in repo.files().values():
        blob = hub_server.state.blob(f.sha256)
        assert b"hf_read_alice" not in blob and b"hf_write_alice" not in blob
    for p in (tmp_path / "publish").rglob("*"):
        if p.is_file():
            assert b"hf_read_alice" not in p.read_bytes() and b"hf_write_alice" not in p.read_bytes(), p
    assert "hf_read_alice" not in made.model_dump_json() and "hf_write_alice" not in made.model_dump_json()
    assert repo.requested_hardware == "cpu-upgrade" and repo.sleep_time == 3600
    secret_posts = hub_server.state.calls("POST", r"/api/spaces/alice/tiny-demo/secrets")
    assert len(secret_posts) == 1


def test_build_error_then_running(tmp_path, hub_server, pushed, caplog):
    hub_server.state.runtime_script["alice/tiny-demo"] = ["BUILDING", "BUILD_ERROR", "BUILDING", "RUNNING"]
    hub_server.state.build_logs["alice/tiny-demo"] = ["Collecting llama-cpp-python==0.3.36", "ERROR: network hiccup"]
    with caplog.at_level("INFO", logger="loraship.space"):
        made = _deploy(tmp_path, pushed)
    assert made.meta["stages"] == ["BUILDING", "BUILD_ERROR", "BUILDING", "RUNNING"]
    assert made.meta["restarts"] == 1 and hub_server.state.repo("alice/tiny-demo", "space").restarts == 1
    assert hub_server.state.calls("POST", r"/api/spaces/alice/tiny-demo/restart")
    assert "ERROR: network hiccup" in caplog.text, "build logs reach the run log"


def test_runtime_error_forever_fails_with_the_last_log_lines(tmp_path, hub_server, pushed):
    hub_server.state.runtime_script["alice/tiny-demo"] = ["RUNTIME_ERROR"]
    with pytest.raises(PermanentError) as err:
        _deploy(tmp_path, pushed, max_restarts=2)
    assert "RUNTIME_ERROR after 2 restart(s)" in str(err.value) and "stage RUNTIME_ERROR" in str(err.value)
    assert hub_server.state.repo("alice/tiny-demo", "space").restarts == 2


def test_write_token_is_never_given_to_the_space(tmp_path, hub_server, pushed):
    with pytest.raises(PermanentError, match="same token"):
        _deploy(tmp_path, pushed, read=WRITE)
    hub_server.state.add_token("hf_other_write", "alice", "write")
    with pytest.raises(PermanentError, match="is a write token"):
        _deploy(tmp_path, pushed, read=SecretStr("hf_other_write"))
    assert ("space", "alice/tiny-demo") not in hub_server.state.repos


def test_unknown_quant_is_a_clear_error(tmp_path, hub_server, pushed):
    with pytest.raises(PermanentError, match="space.quant 'Q2_K'"):
        _deploy(tmp_path, pushed, quant="Q2_K")


def test_dry_run_renders_the_space_folder(tmp_path, hub_server, pushed):
    before = len(hub_server.state.requests)
    made = _deploy(tmp_path, pushed, token=None)
    assert made.meta["dry_run"] and "no hub.token" in made.meta["reason"]
    folder = Path(made.path)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "app.py", "loraship_space.py", "requirements.txt"]
    assert "llama-cpp-python==0.3.36" in (folder / "requirements.txt").read_text()
    plan = json.loads((tmp_path / "publish" / "space.json").read_text())
    assert plan["variables"]["MODEL_FILE"] == "tiny-Q4_K_M.gguf" and plan["secrets"] == ["HF_TOKEN"]
    assert len(hub_server.state.requests) == before
