"""Content-addressed caching through a real Prefect API, each run in its own process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.prefect
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def api_env(prefect_api) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    env["PYTHONPATH"] = str(ROOT)
    return env


def run_probe(env: dict[str, str], in_file: Path, out: Path, counter: Path, *extra: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.cache_probe", str(in_file), str(out), str(counter), *extra],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if line.startswith("STATE=")][-1].removeprefix("STATE=")


def runs(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def test_hit_across_processes_miss_on_change_recompute_on_delete(api_env, tmp_path):
    src, out, counter = tmp_path / "in.txt", tmp_path / "out", tmp_path / "counter"
    src.write_text("hello")

    assert run_probe(api_env, src, out, counter) == "Completed"
    assert runs(counter) == 1 and (out / "upper.txt").read_text() == "HELLO!"

    # Same content, new process: a hit, the work does not run again.
    assert run_probe(api_env, src, out, counter) == "Cached"
    assert runs(counter) == 1

    # Same file name, new content: a miss.
    src.write_text("world")
    assert run_probe(api_env, src, out, counter) == "Completed"
    assert runs(counter) == 2 and (out / "upper.txt").read_text() == "WORLD!"

    # Output deleted behind the cache's back: recomputed, not a dangling hit.
    (out / "upper.txt").unlink()
    assert run_probe(api_env, src, out, counter) == "Completed"
    assert runs(counter) == 3 and (out / "upper.txt").exists()

    # Output changed behind the cache's back: recomputed.
    (out / "upper.txt").write_text("tampered!")
    assert run_probe(api_env, src, out, counter) == "Completed"
    assert (out / "upper.txt").read_text() == "WORLD!" and runs(counter) == 4

    # Different settings: a miss; --refresh: recomputed although cached.
    assert run_probe(api_env, src, out, counter, "?") == "Completed"
    assert run_probe(api_env, src, out, counter, "?") == "Cached"
    assert run_probe(api_env, src, out, counter, "?", "refresh") == "Completed"
    assert runs(counter) == 6
