"""What every loraship Space app shares: the per-session rate limit, the activity line loraship's idle
schedule reads, the Space variables every app takes, and how a problem is shown to the visitor.

The space stage copies this file next to app.py (the manifest's `shared:` list), so a Space needs nothing
from loraship itself; it is plain Python with no dependency beyond the standard library.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict, deque

# tasks/publish/space_costs.py reads the last of these lines from the Space's run log (the Space is not woken)
ACTIVITY_PREFIX = "loraship: activity"
# an answer starting with this is the app reporting a problem (the live smoke test's error_marker)
ERROR_MARK = "⚠️"


def env_int(name: str, default: int) -> int:
    """An integer Space variable; an unset or empty one is the default."""
    return int(os.environ.get(name) or default)


def env_examples(default: list[str]) -> list[str]:
    """EXAMPLES, a JSON list of prompts; unset, empty or unreadable gives the default."""
    try:
        examples = [str(e) for e in json.loads(os.environ.get("EXAMPLES") or "[]")]
    except ValueError:
        examples = []
    return examples or list(default)


def activity() -> None:
    """One run-log line per request, with the UTC time."""
    print(f"{ACTIVITY_PREFIX} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}", flush=True)


class RateLimiter:
    """At most `per_minute` requests per browser session in any 60 s window (RATE_LIMIT_PER_MINUTE)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._sessions: dict[str, deque[float]] = defaultdict(deque)

    def wait(self, request: object) -> float:
        """0 when the request's session may go on now (the request is counted), else the seconds to wait."""
        session = getattr(request, "session_hash", None) or "anonymous"
        now = time.monotonic()
        q = self._sessions[session]
        while q and now - q[0] > 60:
            q.popleft()
        if len(q) >= self.per_minute:
            return 60 - (now - q[0])
        q.append(now)
        return 0.0

    def message(self, wait: float, what: str = "requests") -> str:
        return f"{ERROR_MARK} Rate limit: {self.per_minute} {what} per minute. Try again in {wait:.0f} s."


def error_text(exc: BaseException) -> str:
    """A problem shown in the answer (the app stays up)."""
    return f"{ERROR_MARK} Error: {type(exc).__name__}: {exc}"


def message_text(content: object) -> str:
    """A chat message's text: Gradio gives a string, or a list of parts for multimodal messages."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(c.get("text", "") if isinstance(c, dict) else str(c) for c in content)
    return str(content)
