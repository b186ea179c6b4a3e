"""The one disk-space preflight: fail before the work when its output will not fit.

Every stage that writes something large (merge: the merged folder, convert and quantize: a GGUF, evaluate:
the F16 reference log-probabilities) asks this before it starts, so a full disk is a clear PermanentError
naming the folder, the output and the numbers, not a truncated file an hour later.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tasks.core.errors import PermanentError

#: Room kept beyond the estimate: a tenth of it, and never less than this (metadata, temp files, estimate error).
MIN_MARGIN = 64 * 1024 * 1024
HINT = "free some space, point pipeline.runs_dir at a bigger disk, or enable pipeline.cleanup"


def margin_for(needed: int) -> int:
    return max(needed // 10, MIN_MARGIN)


def disk_preflight(
    folder: Path, needed: int, what: str = "the output", *, free: int | None = None, hint: str = HINT
) -> None:
    """Raise PermanentError unless `folder` (created if missing) has room for `needed` bytes plus the margin.

    `free` overrides the measured free space (tests); `hint` says what the user can change for this output.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free if free is None else free
    margin = margin_for(needed)
    if needed + margin > free:
        raise PermanentError(
            f"not enough disk space in {folder} for {what}: about {needed / 1e9:.2f} GB needed "
            f"(+{margin / 1e6:.0f} MB margin), {free / 1e9:.2f} GB free",
            hint=hint,
        )
