"""Tiny random-weight models for every model-API task, built here (nothing can be downloaded).

BERT-style encoders with a WordPiece tokenizer trained on the project's corpus (classifier, NLI classifier
for zero-shot, token classifier, question answering, masked LM, bare encoder), a tiny causal LM, T5, ViT
with an image processor, and wav2vec2 (CTC) with a feature extractor. Each takes a few seconds and a few
hundred kilobytes; builds are cached like tasks/support/tiny_models.py's (keyed by the arguments and
`VERSION`, behind a file lock). The weights are random: tests check shapes, schemas and plumbing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from tasks.core.constants import cache_root
from tasks.support.tiny_models import build_once, corpus_lines, tiny_model, train_bpe_tokenizer

VERSION = 1
BertHead = Literal[
    "text-classification", "zero-shot", "token-classification", "question-answering", "fill-mask", "base"
]
LABELS: dict[str, list[str]] = {
    "text-classification": ["NEGATIVE", "POSITIVE"],
    "zero-shot": ["contradiction", "neutral", "entailment"],
    "token-classification": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"],
}
#: The model card's pipeline_tag for heads whose architecture alone does not say the task.
CARD_TAGS = {"zero-shot": "zero-shot-classification"}


def _cached(kind: str, builder: Any, **kwargs: Any) -> Path:
    key = hashlib.sha256(json.dumps([kind, kwargs, VERSION], sort_keys=True).encode()).hexdigest()[:16]
    return build_once(cache_root() / "models" / f"task-{kind}-{key}", lambda tmp: builder(tmp, **kwargs))


def _card(out: Path, tag: str) -> None:
    (out / "README.md").write_text(f"---\npipeline_tag: {tag}\nlibrary_name: transformers\n---\n# tiny test model\n")


def _wordpiece(out: Path, vocab_size: int) -> Any:
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(corpus_lines(), vocab_size=vocab_size, min_frequency=1, show_progress=False)
    out.mkdir(parents=True, exist_ok=True)
    wp.save_model(str(out))
    return BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True)


def _build_bert(out: Path, head: str, hidden: int, layers: int, seed: int) -> None:
    import torch
    import transformers
    from transformers import BertConfig

    tok = _wordpiece(out, 512)
    labels = LABELS.get(head)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 16),
        intermediate_size=hidden * 2,
        max_position_embeddings=512,
        **({"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}} if labels else {}),
    )
    cls = {
        "text-classification": "BertForSequenceClassification",
        "zero-shot": "BertForSequenceClassification",
        "token-classification": "BertForTokenClassification",
        "question-answering": "BertForQuestionAnswering",
        "fill-mask": "BertForMaskedLM",
        "base": "BertModel",
    }[head]
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if head in CARD_TAGS:
        _card(out, CARD_TAGS[head])


def tiny_bert(head: BertHead = "text-classification", hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A BERT-style encoder with `head`; `zero-shot` is an NLI classifier (entailment label, card tag)."""
    return _cached("bert", _build_bert, head=head, hidden=hidden, layers=layers, seed=seed)


def tiny_causal_lm() -> Path:
    """A Qwen2-style causal LM with a byte-level BPE tokenizer (tasks/support/tiny_models.py), hidden 64."""
    return tiny_model("qwen2", hidden=64, heads=2, kv_heads=1, intermediate=128)


def _build_t5(out: Path, d_model: int, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    tok = train_bpe_tokenizer(out, 384)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=8,
        d_ff=d_model * 2,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(cfg).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def tiny_t5(d_model: int = 32, seed: int = 0) -> Path:
    return _cached("t5", _build_t5, d_model=d_model, seed=seed)


def _build_vit(out: Path, size: int, seed: int) -> None:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = ["cat", "dog", "owl"]
    cfg = ViTConfig(
        image_size=size,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    torch.manual_seed(seed)
    ViTForImageClassification(cfg).eval().save_pretrained(out, safe_serialization=True)
    ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(out)


def tiny_vit(size: int = 32, seed: int = 0) -> Path:
    return _cached("vit", _build_vit, size=size, seed=seed)


#: The convolutional feature encoder of a tiny wav2vec2: `small` is three layers 16 wide (80x downsampling,
#: layer norm: the fastest that runs), `base` is wav2vec2-base's own seven-layer stack (320x, group norm)
#: at width 32, so frame rates and the CTC output length are those of a real checkpoint.
Wav2Vec2Frontend = Literal["small", "base"]
_FRONTENDS: dict[str, dict[str, Any]] = {
    "small": {
        "conv_dim": (16, 16, 16),
        "conv_stride": (5, 4, 4),
        "conv_kernel": (10, 4, 4),
        "feat_extract_norm": "layer",
        "do_stable_layer_norm": True,
    },
    "base": {"conv_dim": (32,) * 7},  # the config's defaults: strides (5, 2, ...), kernels (10, 3, ..., 2, 2)
}


def _build_wav2vec2(
    out: Path, seed: int, frontend: str = "small", attention_mask: bool = True, blank_bias: float | None = None
) -> None:
    import torch
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    chars = list("abcdefghijklmnopqrstuvwxyz'")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, **{c: i + 5 for i, c in enumerate(chars)}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    tok = Wav2Vec2CTCTokenizer(str(out / "vocab.json"), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|")
    fe = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=attention_mask
    )
    cfg = Wav2Vec2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        pad_token_id=0,
        **_FRONTENDS[frontend],
    )
    torch.manual_seed(seed)
    model = Wav2Vec2ForCTC(cfg).eval()
    if blank_bias is not None:
        with torch.no_grad():
            model.lm_head.bias[0] = blank_bias  # the CTC blank (pad): very negative, it never wins a frame
    model.save_pretrained(out, safe_serialization=True)
    Wav2Vec2Processor(feature_extractor=fe, tokenizer=tok).save_pretrained(out)


def tiny_wav2vec2(
    seed: int = 0, frontend: Wav2Vec2Frontend = "small", attention_mask: bool = True, blank_bias: float | None = None
) -> Path:
    """A wav2vec2 CTC model with its processor (character vocabulary, raw-waveform feature extractor).

    `attention_mask`: whether the feature extractor returns one (wav2vec2-base checkpoints do not);
    `blank_bias`: the CTC blank's output bias (e.g. -10: every frame votes for a character, so a random
    model's transcript is never empty, as the Space and WER tests need)."""
    return _cached(
        "wav2vec2", _build_wav2vec2, seed=seed, frontend=frontend, attention_mask=attention_mask, blank_bias=blank_bias
    )


#: One builder per model-API task (the test fixture and the benchmark pick from here).
BUILDERS: dict[str, Any] = {
    "text-generation": tiny_causal_lm,
    "text-classification": lambda: tiny_bert("text-classification"),
    "token-classification": lambda: tiny_bert("token-classification"),
    "zero-shot-classification": lambda: tiny_bert("zero-shot"),
    "question-answering": lambda: tiny_bert("question-answering"),
    "summarization": tiny_t5,
    "text2text-generation": tiny_t5,
    "fill-mask": lambda: tiny_bert("fill-mask"),
    "feature-extraction": lambda: tiny_bert("base"),
    "image-classification": tiny_vit,
    "automatic-speech-recognition": tiny_wav2vec2,
}
