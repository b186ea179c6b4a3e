"""One scrubber (tasks/core/scrub.py) for every text that leaves a stage: manifest messages, notifications,
logs (also those Prefect sends to its UI) and exception texts."""

from __future__ import annotations

import logging

import pytest
from pydantic import SecretStr

from tasks.core import scrub as scrubber
from tasks.core.errors import PermanentError, TransientError, is_transient
from tasks.core.settings import SecretRef

HF = "hf_" + "aBcDeFgHiJkLmNoPqRsTuVwXyZ01234567"  # shaped like a real Hub token (34 characters after hf_)


def test_known_shapes_are_removed():
    text = (
        f"GET https://alice:s3cr3t-pw@hub.example.com/api failed with {HF}; "
        "Authorization: Bearer abcdefghijklmnop1234; url http://x.test/cb?token=tok123456&ok=1 "
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY----- done "
        "ghp_" + "A" * 36 + " AKIAABCDEFGHIJKLMNOP"
    )
    out = scrubber.scrub(text)
    for secret in ("s3cr3t-pw", HF, "abcdefghijklmnop1234", "tok123456", "b3BlbnNzaC1rZXktdjEAAAAA", "ghp_", "AKIA"):
        assert secret not in out, secret
    assert "https://<credentials>@hub.example.com/api" in out
    assert "ok=1" in out and "done" in out, "only the secret parts go"
    assert scrubber.scrub("nothing to see at http://127.0.0.1:8100/v1") == "nothing to see at http://127.0.0.1:8100/v1"
    assert "<url>" in scrubber.scrub("hook https://hooks.slack.com/services/T0/B0/XYZ", urls=True)


def test_resolved_secrets_are_removed_wherever_they_appear(monkeypatch):
    monkeypatch.setenv("LORASHIP_TEST_TOKEN", "plain-looking-value-42")
    value = SecretRef.model_validate("env:LORASHIP_TEST_TOKEN").resolve()
    assert value.get_secret_value() == "plain-looking-value-42"
    assert scrubber.scrub("the remote said: plain-looking-value-42 is wrong") == "the remote said: <secret> is wrong"
    scrubber.register_secret(SecretStr("another-one-99"))
    assert "another-one-99" not in scrubber.scrub("x another-one-99 y")
    scrubber.register_secret("ab")  # too short to be a secret worth a search: ignored, not everything scrubbed
    assert scrubber.scrub("abc ab") == "abc ab"


def test_exceptions_are_scrubbed_in_place_and_keep_their_type():
    err = TransientError(f"upload to https://u:pw12345@h.test failed ({HF})", hint="retry")
    same = scrubber.scrub_exception(err)
    assert same is err and is_transient(err)
    assert "pw12345" not in str(err) and HF not in str(err) and "pw12345" not in err.message
    plain = RuntimeError(f"token {HF}")
    assert HF not in str(scrubber.scrub_exception(plain))

    class Odd(Exception):  # a library error whose text does not come from its args
        def __str__(self) -> str:
            return f"odd {HF}"

    replaced = scrubber.scrub_exception(Odd())
    assert HF not in str(replaced) and isinstance(replaced, PermanentError)


def test_log_records_are_scrubbed_before_any_handler_sees_them(caplog):
    scrubber.install_log_scrubbing()
    log = logging.getLogger("loraship.test-scrub")
    with caplog.at_level(logging.INFO, logger="loraship.test-scrub"):
        log.info("pushing with %s to %s", HF, "https://bob:hunter22@example.org/x")
        try:
            raise ValueError(f"bad {HF}")
        except ValueError:
            log.exception("failed")
    text = caplog.text
    assert HF not in text and "hunter22" not in text
    assert "https://<credentials>@example.org/x" in text


def test_stage_task_errors_reach_prefect_scrubbed(prefect_api):
    """A stage's exception text is scrubbed before Prefect stores it as the task run's state message."""
    from prefect import flow

    from tasks.core.stage import stage_task

    @stage_task("scrub-probe", retries=0, cache=False)
    def leaky() -> None:
        raise PermanentError(f"the Hub at https://alice:pw-in-url@hub.test refused {HF}")

    @flow
    def probe() -> None:
        leaky()

    state = probe(return_state=True)
    assert state.is_failed()
    with pytest.raises(PermanentError) as err:
        state.result()
    assert HF not in str(err.value) and "pw-in-url" not in str(err.value)
    assert HF not in (state.message or "") and "pw-in-url" not in (state.message or "")


def test_a_registered_key_does_not_hide_the_shape_of_another_key():
    scrubber.register_secret(
        "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAAB3NzaC1yc2EAAAADAQABAAABAQ\n-----END OPENSSH PRIVATE KEY-----"
    )
    out = scrubber.scrub("-----BEGIN OPENSSH PRIVATE KEY-----\nzzzzOtherKeyBody1234\n-----END OPENSSH PRIVATE KEY-----")
    assert out == "<private key>"
