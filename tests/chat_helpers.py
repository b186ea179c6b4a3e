"""Helpers for the template-contract tests: model variants with another chat template or stop token.

The HF side is a copy of a fixture model's tokenizer and config files (no weights: the contract reads only
the tokenizer and generation_config.json); the GGUF side is a fixture GGUF rewritten by gguf-py's own
`gguf_new_metadata` tool (the same tensors, a new `tokenizer.chat_template`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tasks.core.artifacts import Artifact
from tests.deploy_helpers import gguf_artifacts

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "config.json",
    "generation_config.json",
    "chat_template.jinja",
)


def hf_variant(src: Path, dst: Path, template: str | None = None, eos_token_id: int | list[int] | None = None) -> Path:
    """A tokenizer folder like `src` with another chat template and/or generation_config eos_token_id."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    if template is not None:
        (dst / "chat_template.jinja").write_text(template)
    if eos_token_id is not None:
        cfg = json.loads((dst / "generation_config.json").read_text())
        (dst / "generation_config.json").write_text(json.dumps({**cfg, "eos_token_id": eos_token_id}))
    return dst


def gguf_variant(src: Path, dst: Path, template: str) -> Path:
    """`src` with `tokenizer.chat_template` replaced, written by gguf-py's gguf_new_metadata."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmpl = dst.with_suffix(".jinja")
    tmpl.write_text(template)
    subprocess.run(
        [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(src), str(dst), "--chat-template-file", str(tmpl)]
        + ["--force"],
        check=True,
        capture_output=True,
    )
    tmpl.unlink()
    return dst


def variant(
    tmp: Path,
    base: Path,
    ggufs: dict[str, Path],
    template: str,
    name: str = "custom",
    quants: tuple[str, ...] = ("F16", "Q4_K_M"),
    eos_token_id: int | None = None,
) -> tuple[Artifact, list[Artifact]]:
    """(merged artifact, gguf artifacts) of a fixture model given `template` on both sides."""
    hf = hf_variant(base, tmp / f"{name}-hf", template, eos_token_id)
    files = {q: gguf_variant(ggufs[q], tmp / "gguf" / f"{name}-{q}.gguf", template) for q in quants}
    merged = Artifact.from_path(hf, name="merged", kind="merged", stage="merge")
    return merged, gguf_artifacts(files)


def merged_of(base: Path) -> Artifact:
    return Artifact.from_path(base, name="merged", kind="merged", stage="merge")
