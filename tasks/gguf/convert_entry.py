"""Subprocess entry point that runs llama.cpp's convert_hf_to_gguf.py, with a chosen BPE pre-tokenizer.

Run as a script (not imported by the pipeline): `python convert_entry.py --llama-cpp DIR [--vocab-pre
NAME] [--script convert_lora_to_gguf.py] -- <converter arguments>`.
It only uses the standard library and the converter's own modules.

Why a wrapper: upstream's converter identifies a BPE tokenizer's pre-tokenizer by hashing how it
tokenizes a fixed text, and refuses any hash it does not know ("BPE pre-tokenizer was not recognized")
- every brand-new model and every home-trained tokenizer. It has no option to name one. This wrapper
imports the converter's `conversion.base`, wraps `TextModel.get_vocab_base_pre` so that when the hash
is unknown it returns the configured name (e.g. `gpt-2`, `llama-bpe`, `qwen2`) instead of raising, and
then runs the unmodified converter script in this process. A known hash keeps upstream's answer.

With `--fused RECIPE_DIR --fused-report FILE` (merge.fused_convert) it also makes the converter read the base
through tasks/merge/fused.py's tensor source, which applies the adapter tensor by tensor as the converter reads
(this imports the project's own modules), and writes what that source did and checked to FILE as JSON, also
when the converter fails. `--write-merged DIR` (a later stage needs merged/'s weights) makes the same source
also write merged/'s safetensors shards and index into DIR, as the streaming merge would: each merged tensor is
made once for both files, and the base is read once.

Before the converter imports transformers, lean_imports.py (a sibling script module, standard library only) trims
what that import costs (~2 s: transformers' tensor-parallel helpers and its model-file scan, the latter kept under
`--import-cache DIR`); `LORASHIP_LEAN_CONVERTER=0` turns it off.
"""

from __future__ import annotations

import argparse
import json
import logging
import runpy
import sys
from pathlib import Path
from typing import Any

UNKNOWN_MARK = "LORASHIP_UNKNOWN_BPE_PRE"


def _install_vocab_pre(name: str | None) -> None:
    import conversion.base as base  # the converter's own package (on sys.path below)

    original = base.TextModel.get_vocab_base_pre
    log = logging.getLogger("loraship-convert-entry")

    def get_vocab_base_pre(self, tokenizer):  # noqa: ANN001 - signature of the upstream method
        # Upstream logs a loud warning block before raising; keep its log quiet while we decide.
        conv_log = logging.getLogger("hf-to-gguf")
        level = conv_log.level
        conv_log.setLevel(logging.ERROR)
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if not name:
                print(
                    f"{UNKNOWN_MARK}: this BPE tokenizer's pre-tokenizer hash is unknown to llama.cpp",
                    file=sys.stderr,
                    flush=True,
                )
                raise
            log.warning("unknown BPE pre-tokenizer hash: using the configured vocab_pre %r", name)
            return name
        finally:
            conv_log.setLevel(level)

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


def _install_fused(recipe_dir: Path, write_merged: Path | None = None) -> object:
    """Route the converter's safetensors reading through the fused merge (tasks/merge/fused.py)."""
    repo = str(Path(__file__).resolve().parents[2])
    if repo not in sys.path:
        sys.path.append(repo)
    import gguf.lazy  # the converter's own gguf-py (first on sys.path)
    import gguf.utility
    import torch

    from tasks.merge.backends.streaming import merge_threads
    from tasks.merge.fused import FusedRecipe, FusedSource, install, install_fast_casts

    torch.set_num_threads(merge_threads())  # this process is the converter's: its pool leaves a core to it
    source = FusedSource(FusedRecipe.read(recipe_dir), write_merged=write_merged)
    install(source, gguf.utility)
    install_fast_casts(gguf.lazy)  # the F16 cast by torch (same bytes), numpy's was the largest cost
    return source


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        ours, theirs = argv[:i], argv[i + 1 :]
    else:
        ours, theirs = argv, []
    p = argparse.ArgumentParser(prog="convert_entry")
    p.add_argument("--llama-cpp", required=True, type=Path, help="llama.cpp tree holding convert_hf_to_gguf.py")
    p.add_argument("--vocab-pre", default=None, help="pre-tokenizer name for an unknown BPE hash")
    p.add_argument(
        "--script",
        default="convert_hf_to_gguf.py",
        choices=["convert_hf_to_gguf.py", "convert_lora_to_gguf.py"],
        help="which converter to run",
    )
    p.add_argument("--import-cache", type=Path, default=None, help="folder keeping transformers' import structure")
    p.add_argument("--fused", type=Path, default=None, help="merged/ folder holding a fused.json recipe")
    p.add_argument("--fused-report", type=Path, default=None, help="where to write the fused source's report")
    p.add_argument(
        "--write-merged",
        type=Path,
        default=None,
        help="with --fused: also write merged/'s safetensors shards and index into this folder (the shared read)",
    )
    args = p.parse_args(ours)
    root = args.llama_cpp.resolve()
    sys.path[:0] = [str(root / "gguf-py"), str(root)]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s:%(message)s")
    import lean_imports  # a sibling: Python puts a script's own folder on sys.path

    if lean_imports.enabled():
        lean_imports.install(args.import_cache)
    _install_vocab_pre(args.vocab_pre)
    source: Any = _install_fused(args.fused, args.write_merged) if args.fused else None
    script = root / args.script
    sys.argv = [str(script), *theirs]
    converted = False
    try:
        runpy.run_path(str(script), run_name="__main__")
        converted = True
    finally:
        if source is not None:
            merged = None
            try:
                if converted:  # merged/'s tensors the converter did not read, its shards closed, its index
                    merged = source.finish_merged()
            finally:
                report = source.report()
                if merged is not None:
                    report["merged_weights"] = merged
                if args.fused_report:
                    args.fused_report.write_text(json.dumps(report, indent=2))
                source.close()


if __name__ == "__main__":
    main()
