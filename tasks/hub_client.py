"""The Hub client as the publishing stages use it: one HfApi per endpoint+token, and errors translated.

huggingface_hub does the protocol (preupload, LFS batch, NDJSON commits, Space settings); this module
only decides what an error means for the pipeline. 401/403/404 and bad names fail at once with a message
that says what to change (a read-only token, a wrong namespace, a typo in the repo id); 5xx, 429 and
timeouts are `TransientError`s that the stage task retries with backoff. The token never appears in a
message: huggingface_hub does not echo it, and `_scrub` removes it from anything we re-raise.

The endpoint is passed explicitly to every HfApi (settings or the HubCredentials block), because the
module-level helpers of huggingface_hub read HF_ENDPOINT once, at import time.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from tasks.core.errors import PermanentError, TransientError

log = logging.getLogger("loraship.hub")


def hub_api(endpoint: str | None, token: str | None) -> Any:
    """An HfApi for `endpoint` (None: HF_ENDPOINT or huggingface.co) authenticated with `token`."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from huggingface_hub import HfApi

    return HfApi(endpoint=(endpoint or None), token=token or False, library_name="loraship")


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "<token>") if token else text


def translate(exc: BaseException, *, what: str, repo_id: str, token: str | None = None, repo_type: str = "model") -> Exception:
    """The pipeline error for a failed Hub call `what` on `repo_id` (raise it `from exc`)."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, (PermanentError, TransientError)):
        return exc
    status = getattr(getattr(exc, "response", None), "status_code", None)
    detail = _scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, token)
    kind = "Space" if repo_type == "space" else "repo"
    if isinstance(exc, HfHubHTTPError) or status is not None:
        if status == 401:
            return PermanentError(f"{what} {repo_id}: the Hub refused the token (401: {detail})", hint="the token is invalid or expired: create a new one at https://huggingface.co/settings/tokens and update the secret it is read from")
        if status == 403:
            return PermanentError(f"{what} {repo_id}: the token has no write access here (403: {detail})", hint=f"use a token with write access to the namespace {repo_id.split('/')[0]!r} (a fine-grained token needs 'write' on it), and keep the read-only token for the Space")
        if status == 404:
            return PermanentError(f"{what} {repo_id}: {kind} not found (404: {detail})", hint=f"check the {kind} id (owner/name) and that the token's user can see it")
        if status in (400, 422):
            return PermanentError(f"{what} {repo_id}: the Hub rejected the request ({status}: {detail})", hint=f"check the {kind} name: letters, digits, '-', '_' and '.' only, at most 96 characters")
        if status == 409:
            return PermanentError(f"{what} {repo_id}: conflict (409: {detail})", hint="another commit or tag with that name exists; re-run to pick up the new state")
        if status == 412:
            return TransientError(f"{what} {repo_id}: the repo changed during the push (412); retrying on the new head")
        if status is not None and (status >= 500 or status in (408, 429)):
            return TransientError(f"{what} {repo_id}: the Hub answered {status} ({detail}); retrying")
    from tasks.core.errors import is_transient

    if is_transient(exc):
        return TransientError(f"{what} {repo_id}: {type(exc).__name__}: {detail}; retrying")
    return PermanentError(f"{what} {repo_id}: {type(exc).__name__}: {detail}")


def whoami(api: Any, token: str) -> dict[str, Any]:
    """The token's user, checked once before any upload (a bad token fails here, not mid-upload)."""
    try:
        return api.whoami(token=token)
    except Exception as exc:
        raise translate(exc, what="whoami", repo_id="(token check)", token=token) from exc


def validate_card_remote(api: Any, content: str, token: str | None, repo_type: str = "model") -> None:
    """Ask the Hub to validate a README's YAML header (the same check the Hub runs on push)."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    headers = api._build_hf_headers(token=token) if token else {}
    resp = get_session().post(f"{api.endpoint}/api/validate-yaml", json={"content": content, "repoType": repo_type}, headers=headers)
    try:
        body = resp.json()
    except ValueError:
        body = {}
    if resp.status_code == 400:
        errors = "; ".join(e.get("message", "") for e in body.get("errors", []))
        raise PermanentError(f"the Hub rejected the model card's metadata: {errors}", hint="fix the card template or the card settings (license, language, tags)")
    try:
        hf_raise_for_status(resp)
    except Exception as exc:
        raise translate(exc, what="validate card for", repo_id="(card)", token=token) from exc
    for w in body.get("warnings", []):
        log.warning("model card: %s", w.get("message"))
