"""A tiny speech recognition model built here: a random wav2vec2 CTC model with its processor (character
vocabulary tokenizer + feature extractor), saved like a merged repo. It proves the plumbing (upload, decode,
resample, pipeline, timing), not accuracy: its transcription of real speech is noise, but never empty
(the CTC blank is biased down so every frame votes for a character)."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.support.tiny_models import _cached


def _build_wav2vec2(out: Path, version: int) -> None:
    import torch
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    chars = ["<pad>", "<s>", "</s>", "<unk>", "|", *"abcdefghijklmnopqrstuvwxyz'"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(chars)}))
    tok = Wav2Vec2CTCTokenizer(str(out / "vocab.json"), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|")
    fe = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False
    )
    cfg = Wav2Vec2Config(
        vocab_size=len(chars),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        pad_token_id=0,
        ctc_loss_reduction="mean",
    )
    torch.manual_seed(0)
    model = Wav2Vec2ForCTC(cfg)
    with torch.no_grad():
        model.lm_head.bias[0] = -10.0  # the CTC blank (pad) never wins: the transcription is never empty
    model.save_pretrained(out, safe_serialization=True)
    Wav2Vec2Processor(feature_extractor=fe, tokenizer=tok).save_pretrained(out)


def tiny_wav2vec2() -> Path:
    """The cached folder (built once per machine, ~1 s)."""
    return _cached("wav2vec2-ctc-tiny", _build_wav2vec2, version=1)  # bump `version` when the builder changes


def _build_wav2vec2_lora(out: Path, version: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Wav2Vec2ForCTC

    base = tiny_wav2vec2()
    model = Wav2Vec2ForCTC.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)  # a LoRA that changes the model, as a trained one would
    peft_model.save_pretrained(out)


def tiny_wav2vec2_lora() -> Path:
    """A LoRA adapter (q_proj, v_proj, non-zero B) on tiny_wav2vec2(), as a training run leaves it."""
    return _cached("wav2vec2-ctc-tiny-lora", _build_wav2vec2_lora, version=1)
