"""The built-in demo: a tiny Llama-style model and a LoRA adapter really trained here on the toy task.

`python -m flows.full` with no --config runs every stage on it: no network, token or GPU. The model
and adapter are built once into the user cache folder (~/.cache/loraship, or $LORASHIP_CACHE).
Stages that need credentials (Hub push, Space) run as dry runs that stage what they would upload.
"""

from __future__ import annotations

from pathlib import Path

from flows.config import PipelineConfig, parse_config

DEMO_TRAIN_STEPS = 60


def demo_inputs() -> tuple[Path, Path]:
    """(base model folder, adapter folder), built once and cached."""
    from tasks.support.tiny_models import tiny_adapter, tiny_model

    # a tokenizer and chat template that agree with llama.cpp token for token (the template contract checks it)
    base = tiny_model(
        "llama",
        hidden=256,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=512,
        tokenizer_legacy=True,
        bos_in_template=True,
    )
    adapter = tiny_adapter(base, r=8, alpha=16, train_steps=DEMO_TRAIN_STEPS)
    return base, adapter


def demo_config(validate_only: bool = False, runs_dir: str = "runs") -> PipelineConfig:
    if validate_only:
        base, adapter = Path("<demo-base>"), Path("<demo-adapter>")
    else:
        print("building the demo model and adapter (cached after the first run)...", flush=True)
        base, adapter = demo_inputs()
    return parse_config(
        {
            "model": {
                "name": "loraship-demo",
                "version": "v1",
                "base_model": str(base),
                "description": (
                    "A tiny Llama-style model with a LoRA adapter trained for a few seconds on loraship's toy task."
                ),
            },
            "source": {"kind": "local", "path": str(adapter)},
            "merge": {"base_model": str(base)},
            "pipeline": {"runs_dir": runs_dir},
            # The demo links into an LM Studio home inside the run folder, not the user's ~/.lmstudio.
            "deployment": {"lmstudio_home": str(Path(runs_dir) / "loraship-demo" / "lmstudio-home")},
            "serving": {"n_ctx": 256},
            "health_check": {"test_prompts": ["What color is the cat?", "Spell gguf."], "max_tokens": 12},
            "evaluation": {"max_tokens": 12, "n_ctx": 256},
        },
        "built-in demo config",
    )
