"""A tiny speech recognition model built here: a random wav2vec2 CTC model with its processor (character
vocabulary tokenizer + feature extractor), saved like a merged repo. It proves the plumbing (upload, decode,
resample, pipeline, timing), not accuracy: its transcription of real speech is noise, but never empty
(the CTC blank is biased down so every frame votes for a character)."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.support import tiny_task_models as task_models
from tasks.support.tiny_models import _cached


def tiny_wav2vec2() -> Path:
    """The cached folder (built once per machine, ~1 s): tasks/support/tiny_task_models.py's builder with
    wav2vec2-base's seven-layer feature encoder, no attention mask (as base checkpoints) and the CTC blank
    biased down to -10."""
    return task_models.tiny_wav2vec2(frontend="base", attention_mask=False, blank_bias=-10.0)


def _save_lora(model, out: Path) -> None:
    """A LoRA (r 4, q_proj and v_proj, non-zero B) on `model`, saved as a training run leaves it."""
    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)  # a LoRA that changes the model, as a trained one would
    peft_model.save_pretrained(out)


def _build_wav2vec2_lora(out: Path, version: int) -> None:
    from transformers import Wav2Vec2ForCTC

    base = tiny_wav2vec2()
    model = Wav2Vec2ForCTC.from_pretrained(base)
    _save_lora(model, out)


def tiny_wav2vec2_lora() -> Path:
    """A LoRA adapter (q_proj, v_proj, non-zero B) on tiny_wav2vec2(), as a training run leaves it."""
    return _cached("wav2vec2-ctc-tiny-lora", _build_wav2vec2_lora, version=2)  # 2: its base from the support builder


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode alphabet (what a byte-level BPE vocabulary starts from)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


WHISPER_SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|fr|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]


def _build_whisper(out: Path, version: int) -> None:
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    out.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    (out / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(chars)}))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tok = WhisperTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), unk_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": WHISPER_SPECIALS[1:]})
    ids = {t: tok.convert_tokens_to_ids(t) for t in WHISPER_SPECIALS}
    cfg = WhisperConfig(
        vocab_size=len(tok),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_target_positions=64,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg)
    with torch.no_grad():
        model.proj_out.weight[ids["<|endoftext|>"]] -= 1.0  # not the first token: the transcription has text
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        lang_to_id={"<|en|>": ids["<|en|>"], "<|fr|>": ids["<|fr|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        is_multilingual=True,
        no_timestamps_token_id=ids["<|notimestamps|>"],
        max_length=48,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    model.save_pretrained(out, safe_serialization=True)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok).save_pretrained(out)


def tiny_whisper() -> Path:
    """A random multilingual-style Whisper (languages en, fr) with its processor: the language menu's model."""
    return _cached("whisper-tiny-random", _build_whisper, version=1)


def espeak_wav(text: str, path: Path, voice: str = "en") -> Path:
    """`text` spoken by espeak-ng into the WAV `path` (22.05 kHz mono): real speech made here, for the
    Space, health and WER tests. espeak-ng is a test requirement (./setup.sh --test installs it)."""
    import shutil
    import subprocess

    espeak = shutil.which("espeak-ng")
    assert espeak, "espeak-ng is needed (./setup.sh --test installs it)"
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([espeak, "-v", voice, "-w", str(path), text], check=True, capture_output=True)
    return path


def _build_whisper_lora(out: Path, version: int) -> None:
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper())
    # encoder and decoder attention alike, as a Whisper fine-tune targets them
    _save_lora(model, out)


def tiny_whisper_lora() -> Path:
    """A LoRA adapter (q_proj, v_proj of encoder and decoder, non-zero B) on tiny_whisper()."""
    return _cached("whisper-tiny-random-lora", _build_whisper_lora, version=1)
