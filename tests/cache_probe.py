"""A toy stage for the cache tests: uppercases a file; every real execution appends to a counter file.

Run as a script in a separate process (`python -m tests.cache_probe IN OUT_DIR COUNTER`) so the tests
prove a cache hit across processes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flows.env import prepare_environment

prepare_environment()

from prefect import flow  # noqa: E402

from tasks.core.artifacts import Artifact  # noqa: E402
from tasks.core.atomic import atomic_write_text  # noqa: E402
from tasks.core.settings import StrictModel  # noqa: E402
from tasks.core.stage import bind, stage_task  # noqa: E402


class ProbeSettings(StrictModel):
    suffix: str = "!"


def upper(src: Artifact, settings: ProbeSettings, out_dir: Path, counter: Path) -> Artifact:
    with open(counter, "a") as fh:
        fh.write("ran\n")
    out = atomic_write_text(out_dir / "upper.txt", Path(src.path).read_text().upper() + settings.suffix)
    return Artifact.from_path(out, name="upper", kind="report", stage="probe", inputs=[src], settings=settings)


@stage_task("probe", retries=0)
def upper_task(src: Artifact, settings: ProbeSettings, out_dir: Path, counter: Path) -> Artifact:
    return upper(src, settings, out_dir, counter)


@flow(name="cache-probe")
def probe_flow(in_file: str, out_dir: str, counter: str, suffix: str = "!", refresh: bool = False) -> str:
    src = Artifact.from_path(in_file, name="input", kind="report", stage="test")
    task = bind(upper_task, Path(out_dir) / ".cache", refresh=refresh)
    state = task(src, ProbeSettings(suffix=suffix), Path(out_dir), Path(counter), return_state=True)
    state.result()
    return state.name


if __name__ == "__main__":
    a = sys.argv[1:]
    print(
        "STATE="
        + probe_flow(a[0], a[1], a[2], suffix=a[3] if len(a) > 3 else "!", refresh=len(a) > 4 and a[4] == "refresh")
    )
