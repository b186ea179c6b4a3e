"""One shared notion of what is worth retrying.

Transient: the network dropped, a remote answered 5xx or 429, a timeout, a busy port. Retried with
backoff by every stage's task. Permanent: bad input, bad credentials, a missing file, out of memory, a
shape mismatch. Fails at once with a message that says what to change. Stage code raises
`PermanentError`/`TransientError` where it knows; `is_transient` classifies everything else.
"""

from __future__ import annotations

import errno
import socket
import sys
from typing import Any


class PipelineError(Exception):
    """Base of the project's errors: a message for the user and a hint on what to change."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message}\n  -> {hint}")


class PermanentError(PipelineError):
    """Retrying will not help: fix the input, the config or the credentials."""


class TransientError(PipelineError):
    """Worth retrying: the same call may succeed in a moment."""


class FailedWithReport(PermanentError):
    """A stage that fails on what it found, and still hands over the report that says so (`artifacts`): the
    flow records them and later stages (the model card) can read them, also when the run goes on degraded."""

    def __init__(self, message: str, hint: str | None = None, artifacts: list[Any] | None = None):
        super().__init__(message, hint)
        self.artifacts = list(artifacts or [])


class ConfigError(PermanentError):
    """The configuration is invalid; the message names the field path."""


class StageSkipped(Exception):
    """A stage decided there is nothing to do (not an error)."""


_TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EPIPE,
    errno.EADDRINUSE,
}


def http_status_of(exc: BaseException) -> int | None:
    resp = getattr(exc, "response", None)
    code = getattr(resp, "status_code", None)
    return code if isinstance(code, int) else None


def is_transient(exc: BaseException) -> bool:
    """True when retrying `exc` may succeed. Unknown errors are permanent: a wrong retry wastes time."""
    if isinstance(exc, PermanentError) or isinstance(exc, MemoryError):
        return False
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, (TimeoutError, socket.timeout, ConnectionError)):
        return True
    status = http_status_of(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    try:
        import requests

        if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
            return True
    except ImportError:  # pragma: no cover
        pass
    paramiko = sys.modules.get("paramiko")  # never imported: the error cannot be one of its own
    if paramiko is not None:
        if isinstance(exc, paramiko.AuthenticationException):
            return False
        if isinstance(exc, (paramiko.SSHException, EOFError)) and "Error reading SSH protocol banner" in str(exc):
            return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        return is_transient(cause)
    return False


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only what `is_transient` says is worth it."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we classify, not handle
        return is_transient(exc)
    return False
