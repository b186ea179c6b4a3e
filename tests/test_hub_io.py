"""The one Hub call-and-translate wrapper (tasks/publish/hub_io.py: `translated`, `hub_caller`) against the
local Hub-compatible server and the real huggingface_hub client."""

from __future__ import annotations

import pytest

from tasks.core.errors import PermanentError, TransientError
from tasks.publish.hub_io import hub_api, hub_caller, translated


def test_a_caller_turns_hub_answers_into_pipeline_errors(hub_server):
    api = hub_api(hub_server.url, "hf_write_alice")
    call = hub_caller("alice/nothing-here", token="hf_write_alice", repo_type="space")
    with pytest.raises(PermanentError) as err:
        call("read the runtime of", api.get_space_runtime, "alice/nothing-here")
    assert str(err.value).startswith("read the runtime of alice/nothing-here: Space not found (404")
    assert "check the Space id" in err.value.hint
    bad = hub_api(hub_server.url, "hf_not_a_token")
    with pytest.raises(PermanentError) as err:
        hub_caller("alice/m", token="hf_not_a_token")("check the token for", bad.whoami)
    assert "refused the token (401" in str(err.value) and "hf_not_a_token" not in str(err.value)
    assert call("echo", lambda x, *, y: x + y, 1, y=2) == 3  # arguments reach the call untouched


def test_the_block_form_scrubs_the_token_and_keeps_transient_errors_retryable():
    with pytest.raises(PermanentError) as err:
        with translated("read card of", "alice/m", token="hf_secret_value"):
            raise RuntimeError("server said hf_secret_value is odd")
    assert "hf_secret_value" not in str(err.value) and "<token>" in str(err.value)
    with pytest.raises(TransientError):
        with translated("upload to", "alice/m"):
            raise TimeoutError("read timed out")
