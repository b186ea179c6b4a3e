"""Blocks: secrets stay SecretStr, saved blocks resolve through `block:` references."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.prefect


def test_blocks_save_load_and_resolve(prefect_api):
    from blocks import HubCredentials, TrainingHost
    from tasks.core.settings import SecretRef

    HubCredentials(write_token="hf_write_secret", read_token="hf_read_secret").save("test-creds", overwrite=True)
    TrainingHost(host="127.0.0.1", port=2222, private_key="-----BEGIN KEY-----").save("box", overwrite=True)
    creds = HubCredentials.load("test-creds")
    assert "hf_write_secret" not in repr(creds)
    assert (
        SecretRef.model_validate("block:hub-credentials/test-creds").resolve().get_secret_value() == "hf_write_secret"
    )
    assert (
        SecretRef.model_validate("block:hub-credentials/test-creds.read_token").resolve().get_secret_value()
        == "hf_read_secret"
    )
    assert TrainingHost.load("box").port == 2222
    from tasks.core.errors import PermanentError

    with pytest.raises(PermanentError):
        SecretRef.model_validate("block:hub-credentials/nope").resolve()
