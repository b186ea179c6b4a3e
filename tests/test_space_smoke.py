"""The live smoke test: the deployed Space (on the test Hub, runtime RUNNING) is asked one example through
the real gradio_client, against the rendered app launched locally (space.app_url); the answer's length and
latency are recorded, and a failing app fails the stage with the Space's last run-log lines while the
deploy record is still handed over (FailedWithReport: the run goes on degraded)."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from tasks.core.artifacts import Artifact
from tasks.core.errors import FailedWithReport
from tasks.publish.space import SpaceSettings, space, space_inputs
from tasks.publish.space_smoke import SmokeFailed, answer_text, smoke_line, smoke_test
from tasks.publish.space_templates import SPACE_TEMPLATES
from tests.space_apps import free_port, launched
from tests.test_space_app import _merged_repo

pytestmark = pytest.mark.slow


def _record(tmp_path, hub_server, repo: str) -> Artifact:
    return Artifact.from_path(
        tmp_path / "merged" / repo.split("/")[1],
        name="publish:hub:merged",
        kind="publish",
        stage="hub_push",
        meta={"repo_id": repo, "endpoint": hub_server.url, "private": True, "repo_kind": "merged"},
    )


def _app(tmp_path, hub_server, base, token: str):
    repo = _merged_repo(tmp_path, hub_server, base)
    template = SPACE_TEMPLATES["transformers_chat"]
    settings = SpaceSettings(template="transformers_chat", examples=["Hello there"], max_tokens=12)
    inputs = space_inputs(settings, repo, "", "Tiny", "")
    folder = template.render_to(tmp_path / "app", inputs, "apache-2.0")
    return repo, launched(folder, template.variables(inputs), hub_server.url, tmp_path, token=token)


def _deploy(tmp_path, hub_server, repo, url):
    return space(
        None,
        [],
        SpaceSettings(template="auto", app_url=url, examples=["Hello there"], max_tokens=12, poll_interval=0.01),
        tmp_path / "publish",
        model_name="tiny",
        token=SecretStr("hf_write_alice"),
        read_token=SecretStr("hf_read_alice"),
        merged_repo=_record(tmp_path, hub_server, repo),
        sleep=lambda s: None,
    )


def test_smoke_test_records_length_and_latency(tmp_path, hub_server, llama_base):
    repo, app = _app(tmp_path, hub_server, llama_base, token="hf_read_alice")
    with app as url:
        made = _deploy(tmp_path, hub_server, repo, url)
    smoke = made.meta["smoke"]
    assert made.meta["stage"] == "RUNNING" and made.meta["template"] == "transformers_chat"
    assert smoke["ok"] and smoke["api_name"] == "/chat" and smoke["example"] == "Hello there"
    assert smoke["answer_chars"] > 0 and 0 < smoke["latency_s"] < 120 and smoke["connect_s"] >= 0
    assert smoke_line(smoke).startswith(f"smoke test /chat: {smoke['answer_chars']} chars in ")


def test_a_failing_app_fails_the_stage_with_the_last_log_lines(tmp_path, hub_server, llama_base):
    hub_server.state.run_logs["alice/tiny-demo"] = [
        ("2026-01-01T00:00:00Z", "===== Application Startup at 2026-01-01 00:00:00 ====="),
        ("2026-01-01T00:00:01Z", "huggingface_hub.errors.RepositoryNotFoundError: 401 alice/llama"),
    ]
    repo, app = _app(tmp_path, hub_server, llama_base, token="")  # no read token: the private repo is unreadable
    with app as url, pytest.raises(FailedWithReport) as err:
        _deploy(tmp_path, hub_server, repo, url)
    text = str(err.value)
    assert "is RUNNING but its smoke test failed: /chat answered with an error" in text
    assert "RepositoryNotFoundError: 401 alice/llama" in text, "the Space's last log lines"
    (record,) = err.value.artifacts
    assert record.name == "publish:space" and record.meta["smoke"]["ok"] is False
    assert record.meta["stage"] == "RUNNING" and record.meta["smoke"]["log_tail"][-1].startswith("huggingface_hub")


def test_nothing_listening_is_a_smoke_failure():
    with pytest.raises(SmokeFailed, match="could not connect"):
        smoke_test(f"http://127.0.0.1:{free_port()}/", SPACE_TEMPLATES["gguf_chat"], "hi", timeout=5)


def test_answer_text_reads_gradio_6_messages():
    chat = ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text", "text": "a b"}]}],)
    assert answer_text(chat, "chat") == "a b" and answer_text(("x", 1), "text") == "x"
    assert answer_text(([],), "chat") == ""
