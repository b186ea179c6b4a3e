"""Publishing compares with the remote on every run, never with a record of an earlier one.

The local Hub server (tests/hub_server.py) with the real huggingface_hub client; LM Studio's models folder
in a temporary home (the desktop app cannot run here).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from tasks.local import lmstudio
from tasks.publish.card import CardSettings
from tasks.publish.hub_push import HubSettings, hub_push
from tasks.publish.space import SpaceSettings, space
from tests.hub_fixtures import gguf_artifacts

WRITE = SecretStr("hf_write_alice")


def _push(tmp_path: Path, hub, ggufs, sub: str = "a"):
    return hub_push(
        ggufs,
        HubSettings(endpoint=hub.url),
        CardSettings(),
        tmp_path / sub / "publish",
        tmp_path / sub / "reports",
        model_name="tiny",
        version="v1",
        token=WRITE,
    )


def test_files_an_earlier_push_put_there_are_removed_in_the_same_commit(tmp_path, hub_server) -> None:
    from huggingface_hub import HfApi

    three = gguf_artifacts(tmp_path / "g", quants=("F16", "Q8_0", "Q4_K_M"))
    _push(tmp_path, hub_server, three)
    api = HfApi(endpoint=hub_server.url, token="hf_write_alice")
    api.upload_file(path_or_fileobj=b"mine", path_in_repo="notes/by-hand.md", repo_id="alice/tiny-GGUF")
    repo = hub_server.state.repo("alice/tiny-GGUF")
    commits = len(repo.commits)
    art = _push(tmp_path, hub_server, [a for a in three if a.meta["quant"] != "Q8_0"], sub="b")
    files = repo.files()
    assert "tiny-Q8_0.gguf" not in files and "tiny-Q4_K_M.gguf" in files
    assert "notes/by-hand.md" in files  # the project did not put it there: never touched
    assert len(repo.commits) == commits + 1 and art.meta["deleted"] == ["tiny-Q8_0.gguf"]


def test_a_repo_without_a_file_list_loses_nothing(tmp_path, hub_server) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_server.url, token="hf_write_alice")
    api.create_repo("alice/tiny-GGUF")
    api.upload_file(path_or_fileobj=b"old", path_in_repo="tiny-Q2_K.gguf", repo_id="alice/tiny-GGUF")
    art = _push(tmp_path, hub_server, gguf_artifacts(tmp_path / "g", quants=("F16", "Q4_K_M")))
    assert "tiny-Q2_K.gguf" in hub_server.state.repo("alice/tiny-GGUF").files() and art.meta["deleted"] == []


def test_an_unchanged_space_is_not_restarted_and_a_changed_variable_is_sent(tmp_path, hub_server) -> None:
    ggufs = gguf_artifacts(tmp_path / "g")
    pushed = _push(tmp_path, hub_server, ggufs)

    def deploy(**kw):
        settings = SpaceSettings(poll_interval=0.01, timeout=60, smoke_test=False, **kw)  # no app runs here
        return space(pushed, ggufs, settings, tmp_path / "space", model_name="tiny", token=WRITE, sleep=lambda s: 0)

    deploy()
    repo = hub_server.state.repo("alice/tiny-demo", "space")
    before = len(hub_server.state.requests)
    again = deploy()
    assert again.meta["uploaded"] == [] and again.meta["variables_changed"] == []
    assert hub_server.state.calls("POST", r"/restart", since=before) == [] and repo.restarts == 0
    assert hub_server.state.calls("POST", r"/variables", since=before) == []
    changed = deploy(max_tokens=99)
    assert changed.meta["variables_changed"] == ["MAX_TOKENS"] and repo.variables["MAX_TOKENS"]["value"] == "99"
    assert repo.restarts == 1  # the files did not change, so a restart is what applies the new variable


def test_lmstudio_retires_the_files_that_left_the_run(tmp_path) -> None:
    src = tmp_path / "run"
    src.mkdir()
    files = {}
    for q in ("Q4_K_M", "Q8_0"):
        files[f"tiny-{q}.gguf"] = src / f"tiny-{q}.gguf"
        files[f"tiny-{q}.gguf"].write_bytes(q.encode() * 10)
    home = tmp_path / "home"
    lmstudio.link_files(files, home, "loraship", "tiny", "symlink")
    other = lmstudio.models_dir(home) / "loraship" / "tiny-GGUF" / "notes.txt"
    other.write_text("not a GGUF")
    rec = lmstudio.link_files({"tiny-Q4_K_M.gguf": files["tiny-Q4_K_M.gguf"]}, home, "loraship", "tiny", "symlink")
    folder = lmstudio.models_dir(home) / "loraship" / "tiny-GGUF"
    assert sorted(p.name for p in folder.glob("*.gguf")) == ["tiny-Q4_K_M.gguf"] and other.exists()
    assert list(rec["retired"]) == ["tiny-Q8_0.gguf"]
    lmstudio.rollback(home, "loraship", "tiny")  # a rollback brings it back
    assert (folder / "tiny-Q8_0.gguf").is_symlink()
