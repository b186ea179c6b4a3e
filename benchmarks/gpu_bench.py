"""The 7B-size run for a machine with a CUDA GPU and 16+ cores, and the one prepared GPU check (issue 19).

    python -m benchmarks.gpu_bench --all                # THE GPU check: every step below, one JSON, <= 9 minutes
    python -m benchmarks.gpu_bench --all --size tiny --allow-cpu --no-build   # its CPU-safe parts, here
    python -m benchmarks.gpu_bench                      # 7B-size random Llama (13.5 GB bf16): merge, convert, quants
    python -m benchmarks.gpu_bench --size small         # the same steps on a ~0.1B model (checks the script)
    python -m benchmarks.gpu_bench --merge-backend unsloth   # merge on the GPU (needs unsloth + CUDA)

`--all` runs, in order, within `--budget` seconds (default 540; a step that would start after it is recorded
as skipped): `bash setup.sh` (builds llama-cpp-python with CUDA where a toolkit is found, cached); the
unsloth merge test (the tiny bf16 fixture merged by the stage with merge.backend unsloth, verified by the
stage against peft on the same base, 16-bit and QLoRA round trip, compared weight by weight with the
streaming merge in bf16 ulps); the model API's fp16 tests when tasks/model_api exists; the 7B-size
pipeline: the random model, the streaming merge, the unsloth merge (compared with it in ulps, then
deleted for disk), convert, three quants as the quantize plan runs them on all cores (wall against the
CPU floor: the CPU seconds they took / cores), and generation tokens/s of the Q4_K_M on the CPU and with
every layer on the GPU. Without a CUDA GPU, unsloth or a CUDA build of llama.cpp it stops at once naming
what is missing; `--allow-cpu` runs the rest and records those steps as skipped with the reason.
Results: benchmarks/results/gpu_check-<size>.json (or --out).

The seed's pipeline quotes ~30 minutes for merge + convert + three quants of a 7B model on a GPU box; our
goal is 5. The model is written tensor by tensor with random bf16 values (no 13.5 GB model object in
memory, no download), the adapter is written directly as a peft adapter (adapter_config.json +
adapter_model.safetensors). Each stage runs through its plain stage function, as the flow calls it, and is
timed on its own. Results of the single run: benchmarks/results/gpu_bench-<size>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.harness import machine, save, table
from tasks.merge.backends import DEFAULT_BACKEND, MERGE_BACKENDS

SIZES = {
    # Llama-2-7B shapes
    "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
    "small": dict(hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=12, vocab=32000),
    # the check's own test on CPU (rows of 256 and 512 keep the K-quants real)
    "tiny": dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=4, vocab=32000),
}
LINEAR = {
    "q_proj": ("h", "h"),
    "k_proj": ("h", "kv"),
    "v_proj": ("h", "kv"),
    "o_proj": ("h", "h"),
    "gate_proj": ("h", "i"),
    "up_proj": ("h", "i"),
    "down_proj": ("i", "h"),
}


def build_model(out: Path, size: str, shard_bytes: int = 4_000_000_000) -> Path:
    """A random bf16 Llama written shard by shard (safetensors), with the tiny fixture's tokenizer files."""
    import torch
    from safetensors.torch import save_file

    from tasks.support.tiny_models import tiny_model

    if (out / ".complete").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    s = SIZES[size]
    h, i, head_dim = s["hidden"], s["intermediate"], s["hidden"] // s["heads"]
    kv = s["kv_heads"] * head_dim
    dims = {"h": h, "i": i, "kv": kv}
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (s["vocab"], h))]
    for layer in range(s["layers"]):
        p = f"model.layers.{layer}"
        for name, (fan_in, fan_out) in LINEAR.items():
            part = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            shapes.append((f"{p}.{part}.{name}.weight", (dims[fan_out], dims[fan_in])))
        shapes += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (s["vocab"], h))]
    gen = torch.Generator().manual_seed(0)
    index: dict[str, str] = {}
    shard: dict[str, Any] = {}
    shard_size, n = 0, 0
    total = sum(2 * torch.Size(sh).numel() for _, sh in shapes)

    def flush() -> None:
        nonlocal shard, shard_size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, shard_size = {}, 0

    for name, shape in shapes:
        t = (
            torch.ones(shape, dtype=torch.bfloat16)
            if len(shape) == 1
            else (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        )
        if shard_size + 2 * t.numel() > shard_bytes:
            flush()
        shard[name] = t
        shard_size += 2 * t.numel()
    flush()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2)
    )
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "vocab_size": s["vocab"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok = tiny_model("llama", hidden=256)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tok / f).exists():
            shutil.copy(tok / f, out / f)
    (out / ".complete").write_text("ok\n")
    return out


def build_adapter(base: Path, out: Path, size: str, r: int = 16) -> Path:
    """An r=16 LoRA on all linear layers, written directly in peft's format (random A and B)."""
    import torch
    from safetensors.torch import save_file

    if (out / ".complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    s = SIZES[size]
    h, i = s["hidden"], s["intermediate"]
    dims = {"h": h, "i": i, "kv": s["kv_heads"] * (h // s["heads"])}
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(s["layers"]):
        for name, (fan_in, fan_out) in LINEAR.items():
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(r, dims[fan_in], generator=gen) * 0.01).to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(dims[fan_out], r, generator=gen) * 0.01).to(
                torch.bfloat16
            )
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": r,
                "lora_alpha": 2 * r,
                "lora_dropout": 0.0,
                "target_modules": list(LINEAR),
                "base_model_name_or_path": str(base),
                "fan_in_fan_out": False,
                "bias": "none",
                "use_rslora": False,
                "use_dora": False,
                "modules_to_save": None,
            },
            indent=2,
        )
    )
    (out / ".complete").write_text("ok\n")
    return out


def gpu_info() -> str:
    try:
        return (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
            or "none"
        )
    except (OSError, subprocess.TimeoutExpired):
        return "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="7b")
    ap.add_argument("--merge-backend", choices=list(MERGE_BACKENDS), default=DEFAULT_BACKEND)
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for the model and outputs (default: ~/.cache/loraship/gpu-bench)",
    )
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "Q5_K_M", "Q8_0"])
    ap.add_argument("--all", action="store_true", help="the prepared GPU check: every step, one JSON")
    ap.add_argument("--allow-cpu", action="store_true", help="with --all: run what runs without a GPU, skip the rest")
    ap.add_argument("--no-build", action="store_true", help="with --all: do not run setup.sh first")
    ap.add_argument("--budget", type=float, default=540.0, help="with --all: seconds for all steps (default 540)")
    ap.add_argument("--out", type=Path, default=None, help="with --all: the JSON to write")
    args = ap.parse_args()
    if args.all:
        from benchmarks.gpu_check import run_check

        raise SystemExit(run_check(args))

    from tasks.core.artifacts import Artifact
    from tasks.gguf.convert import ConvertSettings, convert
    from tasks.gguf.plan import plan_jobs
    from tasks.gguf.quantize import QuantizeSettings, quantize
    from tasks.merge.stage import MergeSettings, merge
    from tasks.support.tiny_models import cache_root

    work = args.work or cache_root() / "gpu-bench"
    rows: list[dict[str, Any]] = []
    t = time.monotonic()
    base = build_model(work / f"base-{args.size}", args.size)
    adapter = build_adapter(base, work / f"adapter-{args.size}", args.size)
    rows.append({"step": "build random model + adapter (cached)", "seconds": round(time.monotonic() - t, 1)})
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)

    t = time.monotonic()
    adapter_art = Artifact.from_path(adapter, name="adapter", kind="adapter", stage="download")
    merged = merge(
        adapter_art, MergeSettings(backend=args.merge_backend, base_model=str(base), verify="never"), run / "merged"
    )
    rows.append(
        {
            "step": f"merge ({args.merge_backend})",
            "seconds": round(time.monotonic() - t, 1),
            "size_gb": round(merged.size / 1e9, 2),
        }
    )

    t = time.monotonic()
    f16 = convert(merged, ConvertSettings(check_tokenizer=False), run / "gguf", "bench")
    rows.append(
        {"step": "convert (F16)", "seconds": round(time.monotonic() - t, 1), "size_gb": round(f16.size / 1e9, 2)}
    )

    t = time.monotonic()
    plan = plan_jobs(f16.local_path, args.types)
    with ThreadPoolExecutor(max_workers=plan.parallel) as pool:
        quants = list(
            pool.map(
                lambda q: quantize(
                    f16,
                    q,
                    QuantizeSettings(types=args.types),
                    run / "gguf",
                    "bench",
                    threads=plan.threads_for(q),
                    max_buf_size=plan.max_buf_size,
                ),
                plan.start_order(args.types),
            )
        )
    rows.append(
        {
            "step": f"quantize {'+'.join(args.types)} ({plan.parallel} at once x {plan.threads} threads)",
            "seconds": round(time.monotonic() - t, 1),
            "size_gb": round(sum(q.size for q in quants) / 1e9, 2),
        }
    )
    total = sum(r["seconds"] for r in rows[1:])
    rows.append({"step": "merge + convert + quantize", "seconds": round(total, 1)})
    out = save(
        f"gpu_bench-{args.size}",
        {
            "machine": machine(),
            "gpu": gpu_info(),
            "cores": os.cpu_count(),
            "size": args.size,
            "rows": rows,
            "goal_s": 300,
        },
    )
    print(table(rows, ["step", "seconds", "size_gb"]))
    print(f"GPU: {gpu_info()}; total {total:.0f} s (goal 300 s for 7b); written {out}")


if __name__ == "__main__":
    main()
