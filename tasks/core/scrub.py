"""One scrubber for every text that leaves a stage: manifest messages, notifications, logs, the Prefect UI.

Secrets reach error texts in ways no stage can foresee: a library prints the URL it called (with the
`user:password@` of an endpoint), a remote echoes the token it refused, a traceback quotes a key. So
instead of hoping each message is clean, everything that leaves the process passes through `scrub`:

- the value of every secret this process resolved (`register_secret`; `SecretRef.resolve` calls it),
- credentials in URLs (`https://user:pw@host` -> `https://<credentials>@host`) and secret-looking
  query parameters (`?token=...`, `&api_key=...`, `sig=`),
- token shapes (Hugging Face `hf_...`, GitHub, Slack, AWS access key ids, `sk-...` API keys,
  `Authorization: Bearer/Basic ...`),
- private key blocks (`-----BEGIN ... PRIVATE KEY-----`).

`find_secrets` answers the same question for the publish secret scan (tasks/publish/secret_scan.py);
`scrub_exception` cleans an exception in place (its type, and so the retry decision, is kept);
`install_log_scrubbing` wraps the log record factory so that every record, including those Prefect
ships to its API, is scrubbed when it is made, before any handler sees it.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

MIN_SECRET_LEN = 6  # shorter values would scrub ordinary words; real tokens and keys are much longer


@dataclass(frozen=True)
class Pattern:
    """One shape of secret: what it is called (errors name it), how to find it, what replaces it."""

    name: str
    regex: re.Pattern[str]
    replacement: str
    scan: bool = True  # also refused by the publish secret scan


PATTERNS: tuple[Pattern, ...] = (
    Pattern(
        "private key",
        re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY-----|.*)", re.S),
        "<private key>",
    ),
    Pattern(
        "credentials in a URL", re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/@:]+:[^\s/@]+@"), r"\1<credentials>@"
    ),
    Pattern(
        "secret query parameter",
        re.compile(
            r"([?&](?:token|access_token|auth|api_key|apikey|key|secret|password|sig|signature)=)[^&\s#\"']+", re.I
        ),
        r"\1<redacted>",
        scan=False,  # a README may show `?token=` in an example; errors and logs never need the value
    ),
    Pattern("Hugging Face token", re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"), "<hf token>"),
    Pattern("GitHub token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})\b"), "<token>"),
    Pattern("Slack token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), "<token>"),
    Pattern("AWS access key id", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "<aws key id>"),
    Pattern("API key", re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"), "<api key>"),
    Pattern(
        "authorization header",
        re.compile(
            r"\b(Bearer|(?:Authorization|Proxy-Authorization)[:=]\s*(?:Basic|token))\s+[A-Za-z0-9._~+/=-]{8,}", re.I
        ),
        r"\1 <token>",
        scan=False,  # documentation mentions "Bearer <token>"; a staged file with a real one is caught above
    ),
)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")

_known: set[str] = set()
_known_lock = threading.Lock()


def register_secret(value: Any) -> None:
    """Remember a secret this process resolved, so it is removed from every text that leaves it."""
    if value is None:
        return
    text = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
    text = text.strip()
    if len(text) < MIN_SECRET_LEN:
        return
    with _known_lock:
        _known.add(text)
        for line in text.splitlines():  # a key's lines can show up one at a time (a traceback, a diff)
            if len(line.strip()) >= 16 and not line.startswith("-----"):  # not the BEGIN/END armour
                _known.add(line.strip())


def known_secrets() -> list[str]:
    """Every secret value registered so far, longest first (so a long one is replaced before its parts)."""
    with _known_lock:
        return sorted(_known, key=len, reverse=True)


def scrub(text: Any, *, urls: bool = False) -> str:
    """`text` without the secrets this module knows about; `urls=True` also replaces every URL by `<url>`
    (for webhook errors: Slack, Discord and Teams put the key in the URL's path)."""
    out = str(text)
    for p in PATTERNS:
        out = p.regex.sub(p.replacement, out)
    for secret in known_secrets():
        if secret in out:
            out = out.replace(secret, "<secret>")
    if urls:
        out = _URL.sub("<url>", out)
    return out


def find_secrets(text: str) -> list[str]:
    """What kinds of secret `text` holds (empty: none): resolved secrets and the scanned shapes."""
    found = []
    if any(s in text for s in known_secrets()):
        found.append("a secret this run resolved")
    found += [p.name for p in PATTERNS if p.scan and p.regex.search(text)]
    return found


def scrub_exception(exc: BaseException) -> BaseException:
    """`exc` with its text scrubbed, in place when its text comes from its args (the usual case), so the
    type (and what the retry policy thinks of it) is kept. When the text still holds a secret after that
    (a library error that builds its message elsewhere), a PermanentError/TransientError carrying the
    scrubbed text is returned instead: raise the returned exception."""
    from tasks.core.errors import PermanentError, PipelineError, TransientError, is_transient

    if isinstance(exc, PipelineError):
        exc.message = scrub(exc.message)
        exc.hint = scrub(exc.hint) if exc.hint else exc.hint
    try:
        exc.args = tuple(scrub(a) if isinstance(a, str) else a for a in exc.args)
    except (AttributeError, TypeError):  # pragma: no cover - exotic exception types
        pass
    try:
        text = str(exc)
    except Exception:  # pragma: no cover - a broken __str__ tells nothing
        return exc
    clean = scrub(text)
    if clean == text:
        return exc
    kind = TransientError if is_transient(exc) else PermanentError
    return kind(f"{type(exc).__name__}: {clean}")


_installed = False


def install_log_scrubbing() -> None:
    """Scrub every log record when it is created (message, arguments and traceback text), once per process.

    A filter on the `loraship` logger would miss records of other loggers (Prefect's engine logs a
    failed task's exception) and handlers added later (Prefect's API handler, which feeds the UI); the
    record factory sees every record before any of them.
    """
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()
    formatter = logging.Formatter()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave the record as it is
            return record
        clean = scrub(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = scrub(formatter.formatException(record.exc_info))
        record.loraship_scrubbed = True  # the run log files (tasks/core/runlog.py) need not scrub it again
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
