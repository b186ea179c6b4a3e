"""Progress of long work: a Prefect progress artifact in the UI (tasks/core/ui.py) and a tqdm bar on the terminal.

Plain stage functions accept an optional `Progress`; outside a Prefect run it only draws the bar (or
nothing when stderr is not a terminal), so the functions stay testable without Prefect.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tasks.core.ui import create_progress, update_progress

log = logging.getLogger("loraship.progress")


class Progress:
    """Reports `done/total` to the Prefect UI (throttled) and to a terminal bar."""

    def __init__(self, description: str, total: float, unit: str = "B", min_interval: float = 1.0):
        self.description = description
        self.total = max(float(total), 1e-9)
        self.done = 0.0
        self.min_interval = min_interval
        self._last_ui = 0.0
        self._artifact_id: Any = None
        self._bar: Any = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=description, unit=unit, unit_scale=True, leave=False)
            except Exception:  # pragma: no cover
                self._bar = None
        self._artifact_id = create_progress(description)

    def update_to(self, done: float) -> None:
        delta = done - self.done
        self.done = done
        if self._bar is not None and delta:
            self._bar.update(delta)
        now = time.monotonic()
        if self._artifact_id is not None and (now - self._last_ui >= self.min_interval or done >= self.total):
            self._last_ui = now
            update_progress(self._artifact_id, 100.0 * min(done / self.total, 1.0))

    def advance(self, amount: float) -> None:
        self.update_to(self.done + amount)

    def close(self) -> None:
        self.update_to(self.total)
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        elif self._bar is not None:
            self._bar.close()
