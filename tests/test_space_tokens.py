"""The Space's read token: refused unless whoami says it can only read (fine-grained tokens included, as
the Hub's whoami-v2 answers for them), and a rotated token reaches the Space secret on the next run.

The Hub is tests/hub_server.py, which models classic (read/write) and fine-grained tokens (role
`fineGrained`, global and per-entity scoped permissions), driven by the real huggingface_hub client."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from tasks.core.errors import PermanentError
from tasks.publish.space import SpaceSettings, space
from tests.test_space import FAST, WRITE, pushed  # noqa: F401 - the fixture


def _deploy(tmp_path, repo_record, read):
    art, ggufs = repo_record
    return space(
        art,
        ggufs,
        SpaceSettings(**FAST),
        tmp_path / "publish",
        model_name="tiny",
        token=WRITE,
        read_token=read,
        sleep=lambda s: None,
    )


def test_the_test_hub_answers_whoami_like_the_hub_for_fine_grained_tokens(hub_server):
    from huggingface_hub import HfApi

    hub_server.state.add_token(
        "hf_fg_alice", "alice", "fineGrained", scoped=["repo.content.read", "repo.write"], global_=["post.write"]
    )
    me = HfApi(endpoint=hub_server.url).whoami(token="hf_fg_alice")
    token = me["auth"]["accessToken"]
    assert token["role"] == "fineGrained"
    (scope,) = token["fineGrained"]["scoped"]
    assert scope["entity"]["name"] == "alice" and scope["entity"]["type"] == "user"
    assert scope["permissions"] == ["repo.content.read", "repo.write"]
    assert token["fineGrained"]["global"] == ["post.write"]
    # and it may write to alice's repos (repo.write), unlike a fine-grained token without that scope
    HfApi(endpoint=hub_server.url, token="hf_fg_alice").create_repo("alice/fg-ok")
    hub_server.state.add_token("hf_fg_readonly", "alice", "fineGrained", scoped=["repo.content.read"])
    with pytest.raises(Exception, match="403"):
        HfApi(endpoint=hub_server.url, token="hf_fg_readonly").create_repo("alice/fg-no")


def test_a_fine_grained_token_with_any_write_scope_is_refused(tmp_path, hub_server, pushed):  # noqa: F811
    hub_server.state.add_token("hf_fg_write", "alice", "fineGrained", scoped=["repo.content.read", "repo.write"])
    with pytest.raises(PermanentError, match="repo.write"):
        _deploy(tmp_path, pushed, SecretStr("hf_fg_write"))
    hub_server.state.add_token(
        "hf_fg_post", "alice", "fineGrained", scoped=["repo.content.read"], global_=["post.write"]
    )
    with pytest.raises(PermanentError, match="post.write"):
        _deploy(tmp_path, pushed, SecretStr("hf_fg_post"))
    assert ("space", "alice/tiny-demo") not in hub_server.state.repos, "refused before the Space was made"
    hub_server.state.add_token("hf_fg_read", "alice", "fineGrained", scoped=["repo.content.read"])
    made = _deploy(tmp_path, pushed, SecretStr("hf_fg_read"))
    assert made.meta["secrets"] == ["HF_TOKEN"]
    assert hub_server.state.repo("alice/tiny-demo", "space").secrets["HF_TOKEN"]["value"] == "hf_fg_read"


def test_a_rotated_read_token_reaches_the_space_on_the_next_run(tmp_path, hub_server, pushed, prefect_api):  # noqa: F811
    """Two runs of the (cached) space task with everything the same but the read token."""
    from prefect import flow

    from tasks.core.stage import bind
    from tasks.publish.space import space_task

    art, ggufs = pushed
    hub_server.state.add_token("hf_read_rotated", "alice", "read")
    cache = Path(tmp_path / ".cache")

    @flow
    def deploy(read: str) -> str:
        task = bind(space_task, cache)
        state = task(
            art,
            ggufs,
            SpaceSettings(**FAST),
            tmp_path / "publish",
            model_name="tiny",
            _token=WRITE,
            _read_token=SecretStr(read),
            return_state=True,
        )
        state.result()
        return state.name

    assert deploy("hf_read_alice") == "Completed"
    repo = hub_server.state.repo("alice/tiny-demo", "space")
    assert repo.secrets["HF_TOKEN"]["value"] == "hf_read_alice"
    assert deploy("hf_read_alice") == "Cached", "nothing changed: nothing to do"
    assert deploy("hf_read_rotated") == "Completed"
    assert repo.secrets["HF_TOKEN"]["value"] == "hf_read_rotated"
    assert "hf_read_rotated" not in "".join(p.name for p in cache.iterdir()), "the key is not the token"
