"""Helpers for the Hub/card/Space tests: small real GGUF files and the artifacts the earlier stages make.

The GGUFs here are written with gguf-py's GGUFWriter (real GGUF files with a tensor table, so the card
can read parameter counts), not runnable models: the push tests move bytes and do not need a model. The
Space browser test uses the convert/quantize stage's `llama_ggufs` fixture, which is a runnable model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tasks.core.artifacts import Artifact


def write_gguf(path: Path, n: int = 4096, seed: int = 0) -> Path:
    from gguf import GGUFWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(str(path), "llama")
    w.add_name(path.stem)
    rng = np.random.default_rng(seed)
    w.add_tensor("token_embd.weight", rng.standard_normal((n // 64, 64)).astype(np.float32))
    w.add_tensor("output.weight", rng.standard_normal((n // 64, 64)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_artifacts(
    folder: Path, model: str = "tiny", quants: tuple[str, ...] = ("F16", "Q8_0", "Q4_K_M"), seed: int = 0
) -> list[Artifact]:
    out = []
    for i, q in enumerate(quants):
        p = write_gguf(folder / f"{model}-{q}.gguf", n=4096 * (3 - min(i, 2)), seed=seed + i)
        out.append(
            Artifact.from_path(
                p, name=f"gguf:{q}", kind="gguf", stage="quantize" if q != "F16" else "convert", meta={"quant": q}
            )
        )
    return out


def adapter_artifact(folder: Path, base: str = "acme/tiny-base") -> Artifact:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 8,
                "lora_alpha": 16,
                "target_modules": ["v_proj", "q_proj"],
                "lora_dropout": 0.05,
                "base_model_name_or_path": base,
            }
        )
    )
    (folder / "trainer_state.json").write_text(
        json.dumps(
            {"global_step": 60, "epoch": 3.0, "log_history": [{"loss": 2.5, "step": 10}, {"loss": 1.25, "step": 60}]}
        )
    )
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 2048)
    files = {n: str(folder / n) for n in ("adapter_config.json", "trainer_state.json")}
    return Artifact.from_path(folder, name="adapter", kind="adapter", stage="download", meta={"metadata_files": files})


def eval_artifact(path: Path, quants: dict[str, dict[str, float]], reference: str | None = None) -> Artifact:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(quants))
    meta: dict = {"quants": quants, **({"reference": reference} if reference else {})}
    return Artifact.from_path(path, name="report:eval", kind="report", stage="evaluate", meta=meta)
