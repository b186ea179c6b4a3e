"""Helpers for the local_deploy/serve/health/eval tests: GGUF artifacts from the fixture files, fake CLIs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tasks.core.artifacts import Artifact


def gguf_artifacts(ggufs: dict[str, Path], quants: tuple[str, ...] | None = None) -> list[Artifact]:
    """`gguf:<QUANT>` records (kind gguf, meta.quant) for the `llama_ggufs` fixture's files."""
    return [
        Artifact.from_path(p, name=f"gguf:{q}", kind="gguf", stage="quantize", meta={"quant": q})
        for q, p in ggufs.items()
        if quants is None or q in quants
    ]


def fake_cli(bin_dir: Path, name: str, output: str = "ok", rc: int = 0) -> Path:
    """An executable `name` that appends its arguments (one call per line) to <bin_dir>/<name>.calls.

    It stands in for a desktop app's CLI (LM Studio's `lms`, `ollama`), which cannot run on this machine.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / name
    calls = bin_dir / f"{name}.calls"
    exe.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\necho "{output}"\nexit {rc}\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


def calls_of(exe: Path) -> list[str]:
    calls = exe.parent / f"{exe.name}.calls"
    return calls.read_text().splitlines() if calls.exists() else []


def path_with(bin_dir: Path) -> str:
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
