"""Hub push against the local Hub-compatible server (tests/hub_server.py), with the real huggingface_hub client."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pydantic import SecretStr

from tasks.core.errors import PermanentError, TransientError, is_transient
from tasks.publish.card import CardSettings
from tasks.publish.hub_push import HubSettings, hub_push
from tests.hub_fixtures import adapter_artifact, gguf_artifacts

WRITE = SecretStr("hf_write_alice")


@pytest.fixture
def inputs(tmp_path):
    return gguf_artifacts(tmp_path / "gguf"), adapter_artifact(tmp_path / "adapter")


def _push(tmp_path, hub, inputs, token=WRITE, **hub_kw):
    ggufs, adapter = inputs
    settings = HubSettings(endpoint=hub.url, **hub_kw)
    return hub_push(
        ggufs,
        settings,
        CardSettings(),
        tmp_path / "publish",
        tmp_path / "reports",
        model_name="tiny",
        version="v1",
        adapter=adapter,
        token=token,
    )


def _sha(p: str | Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def test_push_one_commit_and_download_back(tmp_path, hub_server, inputs):
    from huggingface_hub import hf_hub_download

    art = _push(tmp_path, hub_server, inputs)
    repo = hub_server.state.repo("alice/tiny-GGUF")
    assert art.meta["repo_id"] == "alice/tiny-GGUF" and not art.meta["dry_run"]
    assert len(repo.commits) == 2, "initial commit + exactly one push commit"
    files = repo.files()
    for name in (
        "README.md",
        "loraship.json",
        "tiny-F16.gguf",
        "tiny-Q8_0.gguf",
        "tiny-Q4_K_M.gguf",
        "adapter/adapter_config.json",
        "training/trainer_state.json",
    ):
        assert name in files, name
    assert files["tiny-Q4_K_M.gguf"].lfs and not files["README.md"].lfs
    assert repo.tags == {"v1": repo.head.oid}
    assert hub_server.state.calls("POST", r"/api/validate-yaml"), "the card is validated by the Hub before the commit"
    for g in inputs[0]:
        name = Path(g.path).name
        got = hf_hub_download(
            "alice/tiny-GGUF", name, endpoint=hub_server.url, token="hf_read_alice", cache_dir=tmp_path / "dl"
        )
        assert _sha(got) == g.sha256
    got = hf_hub_download(
        "alice/tiny-GGUF",
        "tiny-Q4_K_M.gguf",
        revision="v1",
        endpoint=hub_server.url,
        token="hf_read_alice",
        cache_dir=tmp_path / "dl2",
    )
    assert _sha(got) == inputs[0][2].sha256
    assert "hf_write_alice" not in (tmp_path / "reports" / "hub_push.json").read_text()
    assert "hf_write_alice" not in art.model_dump_json()


def test_second_push_sends_nothing(tmp_path, hub_server, inputs):
    _push(tmp_path, hub_server, inputs)
    before = len(hub_server.state.requests)
    art = _push(tmp_path, hub_server, inputs)
    assert art.meta["uploaded"] == [] and len(art.meta["skipped"]) >= 5
    assert hub_server.state.calls("PUT", r".", since=before) == []
    assert hub_server.state.calls("POST", r"/commit/", since=before) == []
    assert hub_server.state.calls("POST", r"/lfs/objects/batch", since=before) == []
    assert len(hub_server.state.repo("alice/tiny-GGUF").commits) == 2


def test_changed_file_only_is_sent(tmp_path, hub_server, inputs):
    from tasks.core.artifacts import Artifact
    from tests.hub_fixtures import write_gguf

    _push(tmp_path, hub_server, inputs)
    ggufs, adapter = inputs
    q4 = ggufs[2]
    write_gguf(Path(q4.path), n=8192, seed=42)
    ggufs = [*ggufs[:2], Artifact.from_path(q4.path, name=q4.name, kind="gguf", stage="quantize", meta=q4.meta)]
    before = len(hub_server.state.requests)
    art = _push(tmp_path, hub_server, (ggufs, adapter))
    assert "tiny-Q4_K_M.gguf" in art.meta["uploaded"] and "tiny-Q8_0.gguf" in art.meta["skipped"]
    puts = hub_server.state.calls("PUT", r"/lfs-upload/", since=before)
    assert len(puts) == 1 and puts[0].body_bytes == Path(q4.path).stat().st_size


def test_existing_repo_is_reused(tmp_path, hub_server, inputs):
    from huggingface_hub import HfApi

    HfApi(endpoint=hub_server.url, token="hf_write_alice").create_repo("alice/tiny-GGUF")
    art = _push(tmp_path, hub_server, inputs)
    assert [r.status for r in hub_server.state.calls("POST", r"/api/repos/create")] == [200, 409]
    assert "tiny-Q8_0.gguf" in hub_server.state.repo("alice/tiny-GGUF").files()
    assert art.meta["commit"] == hub_server.state.repo("alice/tiny-GGUF").head.oid


def test_bad_token_fails_at_once_without_echoing_it(tmp_path, hub_server, inputs):
    with pytest.raises(PermanentError) as err:
        _push(tmp_path, hub_server, inputs, token=SecretStr("hf_not_a_real_token"))
    assert "401" in str(err.value) and "token" in str(err.value)
    assert "hf_not_a_real_token" not in str(err.value)
    assert not is_transient(err.value)
    assert hub_server.state.repos == {}


def test_read_token_or_foreign_namespace_is_403(tmp_path, hub_server, inputs):
    with pytest.raises(PermanentError, match="write access"):
        _push(tmp_path, hub_server, inputs, token=SecretStr("hf_read_alice"), repo_id="alice/tiny-GGUF")
    with pytest.raises(PermanentError, match="403"):
        _push(tmp_path, hub_server, inputs, token=SecretStr("hf_write_bob"), repo_id="alice/other")


def test_500_then_success_resumes_without_resending(tmp_path, hub_server, inputs):
    hub_server.state.fail_next("POST", r"/api/models/alice/tiny-GGUF/commit/", status=500)
    with pytest.raises(TransientError) as err:
        _push(tmp_path, hub_server, inputs)
    assert is_transient(err.value), "a 5xx is retried by the stage task"
    first_puts = len(hub_server.state.calls("PUT", r"/lfs-upload/"))
    assert first_puts == 4  # three GGUFs and the adapter's safetensors were stored before the commit failed
    before = len(hub_server.state.requests)
    art = _push(tmp_path, hub_server, inputs)  # what the task's retry does
    assert hub_server.state.calls("PUT", r"/lfs-upload/", since=before) == [], "stored LFS objects are not sent again"
    assert len(hub_server.state.repo("alice/tiny-GGUF").commits) == 2
    assert art.meta["commit"] == hub_server.state.repo("alice/tiny-GGUF").head.oid


def test_dry_run_stages_the_exact_repo_folder(tmp_path, hub_server, inputs):
    art = _push(tmp_path, hub_server, inputs, token=None, repo_id="alice/tiny-GGUF")
    folder = Path(art.path)
    assert art.meta["dry_run"] and art.meta["reason"] == "no hub.token configured"
    assert folder == tmp_path / "publish" / "hub" / "alice__tiny-GGUF"
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert "README.md" in names and "tiny-Q4_K_M.gguf" in names and "loraship.json" in names
    assert _sha(folder / "tiny-Q4_K_M.gguf") == inputs[0][2].sha256
    assert hub_server.state.requests == [], "a dry run sends nothing"
    # the staged folder is what a real push sends, file for file
    real = _push(tmp_path / "real", hub_server, inputs, repo_id="alice/tiny-GGUF")
    assert sorted(real.meta["uploaded"]) == sorted(names)
