"""Tiny but real models, built on this machine: for tests, the demo and the benchmarks.

No weights or data sets can be downloaded here, and users want a demo that needs no network, so we
build models from a config: a Llama-style model with a SentencePiece tokenizer and a Qwen2-style model
with a byte-level BPE tokenizer, both trained here on a small corpus and given a chat template, and
LoRA adapters made with peft (non-zero B, so a merge changes outputs), optionally really trained on the
bundled toy task. Builds are cached in a user cache folder keyed by this module's source and the
arguments, behind a file lock, so parallel test workers and repeated runs build once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock

from tasks.core.atomic import atomic_dir
from tasks.core.constants import TASKS_DATA, cache_root

DATA = TASKS_DATA
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: ChatML that starts with the BOS, as Llama-family templates do: for a tokenizer that adds a BOS
#: (add_bos_token), so transformers, llama.cpp and Ollama all see exactly one (the template contract checks it).
CHATML_BOS = "{{ bos_token }}" + CHATML
SPECIALS = ["<|im_start|>", "<|im_end|>"]


def toy_pairs() -> list[dict[str, str]]:
    return [json.loads(line) for line in (DATA / "toy_task.jsonl").read_text().splitlines() if line.strip()]


def corpus_lines() -> list[str]:
    """Text to train the tokenizers on: the toy task, chat markup words, and generic English."""
    lines = []
    for p in toy_pairs():
        lines += [p["prompt"], p["response"], f"user {p['prompt']} assistant {p['response']}"]
    generic = (
        "The quick brown fox jumps over the lazy dog. A merged model is converted to GGUF and quantized. "
        "Hello world! How are you today? Once upon a time there was a small model that learned to count. "
        "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12. Punctuation, quotes 'single' and \"double\"; colons: yes. "
        "system You are a helpful assistant. Tell me a story about a cat, a dog and an owl."
    )
    lines += generic.split(". ") * 4
    return lines


# Bump when a builder's output changes: the cache key is this version + the builder's arguments (not the
# module source, so unrelated edits here do not rebuild every fixture and the caches built on them).
BUILDERS_VERSION = 2


def _key(kind: str, **kwargs: Any) -> str:
    return hashlib.sha256(
        json.dumps([kind, kwargs, BUILDERS_VERSION], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]


def build_once(out: Path, builder: Callable[[Path], None], marker: str = ".complete") -> Path:
    """Build the folder `out` once: under a file lock, into a temporary folder renamed into place, so
    parallel sessions build it once and never see a half-written one. `builder(tmp)` fills the folder;
    `marker` (written here unless the builder wrote it) says the build finished."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / marker).exists():
            with atomic_dir(out) as tmp:
                builder(tmp)
                if not (tmp / marker).exists():
                    (tmp / marker).write_text("ok\n")
    return out


def _cached(kind: str, builder, **kwargs: Any) -> Path:
    """Build once into the cache folder and return the folder."""
    return build_once(cache_root() / "models" / f"{kind}-{_key(kind, **kwargs)}", lambda tmp: builder(tmp, **kwargs))


# --- tokenizers -------------------------------------------------------------------------------------


def train_sentencepiece_tokenizer(
    out_dir: Path, vocab_size: int = 384, legacy: bool = False, chat_template: str = CHATML
) -> Any:
    """A Llama-style tokenizer: SentencePiece BPE with byte fallback, saved with tokenizer.model.

    `legacy=True` tokenizes text after a special token as llama.cpp does (with the SentencePiece space
    prefix); transformers' legacy=False does not, which the template contract reports as a difference.
    """
    import io

    import sentencepiece as spm
    from tokenizers.models import BPE
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=SPECIALS,
        minloglevel=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())
    # transformers 5 builds Llama tokenizers from (vocab, merges); take both from the SentencePiece model
    # so tokenizer.json and tokenizer.model agree (llama.cpp reads tokenizer.model).
    extracted = SentencePieceExtractor(str(out_dir / "tokenizer.model")).extract(BPE)
    tok = LlamaTokenizer(
        vocab=extracted["vocab"],
        merges=extracted["merges"],
        legacy=legacy,
        add_bos_token=True,
        add_eos_token=False,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = chat_template
    return tok


def pad_vocabulary(tk: Any, size: int) -> Any:
    """The tokenizer with its BPE vocabulary grown to `size` entries by adding tokens no merge produces.

    Real vocabularies (Qwen2.5: 151,936) are what make an evaluation's logits big; no such tokenizer can be
    downloaded here, so a trained small one is padded: the added entries are ordinary vocabulary (not added
    special tokens, which llama.cpp would match in every text), they only widen embeddings and logits.
    """
    from tokenizers import Tokenizer

    data = json.loads(tk.to_str())
    vocab = data["model"]["vocab"]  # the special tokens are in it too (trained with them)
    i = 0
    while len(vocab) < size:
        vocab.setdefault(f"\u0120pad{i:06d}", len(vocab))
        i += 1
    return Tokenizer.from_str(json.dumps(data))


def train_bpe_tokenizer(out_dir: Path, vocab_size: int = 384, pad_to: int | None = None) -> Any:
    """A Qwen2-style byte-level BPE tokenizer (its pre-tokenizer hash is unknown to llama.cpp: use vocab_pre);
    `pad_to`: grown to that many tokens (pad_vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", *SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus_lines(), trainer=trainer)
    if pad_to:
        tk = pad_vocabulary(tk, pad_to)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    tok.chat_template = CHATML
    return tok


# --- models -----------------------------------------------------------------------------------------


def _build_model(
    out: Path,
    arch: Literal["llama", "qwen2"],
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab_size: int,
    seed: int,
    dtype: str,
    tie: bool,
    shard_size: str | None = None,
    tokenizer_legacy: bool = False,
    bos_in_template: bool = False,
    pad_vocab_to: int | None = None,
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    if arch == "llama":
        template = CHATML_BOS if bos_in_template else CHATML
        tok = train_sentencepiece_tokenizer(out, vocab_size, legacy=tokenizer_legacy, chat_template=template)
    else:
        tok = train_bpe_tokenizer(out, vocab_size, pad_vocab_to)
    n_vocab = len(tok)
    common = dict(
        vocab_size=n_vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-6,
    )
    if arch == "llama":
        cfg = LlamaConfig(**common, bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    else:
        cfg = Qwen2Config(**common, bos_token_id=None, eos_token_id=tok.eos_token_id, use_sliding_window=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    with torch.no_grad():
        for p in model.parameters():  # a visible spread so a merge's change shows in every quant type
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
    model.generation_config = GenerationConfig(
        eos_token_id=cfg.eos_token_id, bos_token_id=cfg.bos_token_id, max_new_tokens=32
    )
    model.save_pretrained(out, safe_serialization=True, **({"max_shard_size": shard_size} if shard_size else {}))
    tok.save_pretrained(out)
    if arch == "llama" and tokenizer_legacy:
        # transformers 5 does not save `legacy` and reloads a Llama tokenizer with legacy=False (no space prefix
        # after special tokens): write it, so the reloaded tokenizer is the one trained here
        cfg_path = out / "tokenizer_config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "legacy": True}, indent=2))


def tiny_model(
    arch: Literal["llama", "qwen2"] = "llama",
    hidden: int = 256,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 512,
    vocab_size: int = 384,
    seed: int = 0,
    dtype: str = "float32",
    tie: bool = False,
    shard_size: str | None = None,
    tokenizer_legacy: bool = False,
    bos_in_template: bool = False,
    pad_vocab_to: int | None = None,
) -> Path:
    """A cached causal LM folder (config, safetensors, tokenizer with chat template); small by default,
    benchmark-sized when asked (e.g. hidden=1280, layers=24, intermediate=3456: ~0.5B parameters).

    `tokenizer_legacy` / `bos_in_template` (Llama only) make a tokenizer and template that agree with
    llama.cpp token for token (the demo's); `pad_vocab_to` (qwen2 only): a vocabulary of that many tokens
    (e.g. Qwen2.5's 151,936). Options left at their defaults stay out of the cache key, so existing builds
    keep theirs."""
    extra: dict[str, Any] = {"shard_size": shard_size} if shard_size else {}
    extra |= {k: True for k, v in (("tokenizer_legacy", tokenizer_legacy), ("bos_in_template", bos_in_template)) if v}
    if pad_vocab_to:
        extra["pad_vocab_to"] = pad_vocab_to
    return _cached(
        f"{arch}-h{hidden}",
        _build_model,
        arch=arch,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab_size=vocab_size,
        seed=seed,
        dtype=dtype,
        tie=tie,
        **extra,
    )


# --- adapters ---------------------------------------------------------------------------------------


def _build_adapter(
    out: Path,
    base: str,
    r: int,
    alpha: int,
    targets: list[str],
    seed: int,
    train_steps: int,
    use_rslora: bool,
    modules_to_save: list[str] | None,
    lr: float,
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        lora_dropout=0.0,
        use_rslora=use_rslora,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # non-zero B: an untrained adapter must still change the outputs
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    log: list[dict[str, float]] = []
    if train_steps:
        log = _train(peft_model, AutoTokenizer.from_pretrained(base), train_steps, lr)
    peft_model.save_pretrained(out, safe_serialization=True)
    cfg_path = out / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = str(base)
    cfg_path.write_text(json.dumps(data, indent=2))
    if train_steps:
        state = {"global_step": train_steps, "log_history": log, "train_dataset": "loraship toy task (bundled)"}
        (out / "trainer_state.json").write_text(json.dumps(state, indent=2))
        (out / "training_args.json").write_text(
            json.dumps(
                {
                    "learning_rate": lr,
                    "max_steps": train_steps,
                    "per_device_train_batch_size": len(toy_pairs()),
                    "lora_r": r,
                    "lora_alpha": alpha,
                },
                indent=2,
            )
        )


def _train(model: Any, tok: Any, steps: int, lr: float) -> list[dict[str, float]]:
    """A few seconds of real training on the toy task (full batch, AdamW, loss on the answer tokens)."""
    import torch

    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["response"]}], tokenize=False
        )
        for p in toy_pairs()
    ]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    # A template that writes the BOS itself must not get a second one from the tokenizer; the older fixtures
    # (template without BOS) keep the tokenizer's BOS, as their cached adapters were trained with it.
    writes_bos = "bos_token" in (tok.chat_template or "")
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not writes_bos)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    history = []
    for step in range(1, steps + 1):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 1 or step % 10 == 0 or step == steps:
            history.append({"step": step, "loss": round(float(loss.detach()), 4)})
    model.eval()
    return history


def tiny_adapter(
    base: Path | str,
    r: int = 8,
    alpha: int = 16,
    targets: list[str] | None = None,
    seed: int = 1,
    train_steps: int = 0,
    use_rslora: bool = False,
    modules_to_save: list[str] | None = None,
    lr: float = 3e-3,
) -> Path:
    """A cached LoRA adapter for `base` (adapter_config.json + adapter_model.safetensors)."""
    targets = targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return _cached(
        "adapter",
        _build_adapter,
        base=str(base),
        r=r,
        alpha=alpha,
        targets=targets,
        seed=seed,
        train_steps=train_steps,
        use_rslora=use_rslora,
        modules_to_save=modules_to_save,
        lr=lr,
    )


def copy_tree(src: Path, dst: Path) -> Path:
    """A private copy of a cached fixture (tests that modify files must not touch the cache)."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    lock = dst / ".complete"
    lock.unlink(missing_ok=True)
    return dst
