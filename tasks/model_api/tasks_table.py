"""The pipeline tasks a deployment can serve: one row each, in a registry (tasks/core/registry.py).

A row says everything the rest of the package needs about a task, as data: its aliases, what input it
takes (text, question + context, image, audio), its validated parameters, the shape of one result (for
/docs), an example request, how to load its model (Auto classes), how to recognise it from a model's
`pipeline_tag` or `architectures`, and the one function that calls the pipeline on a batch. Adding a task
is one row here; server, deploy, docs and the CLI's choices read the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.core.errors import PermanentError
from tasks.core.registry import Contract, Registry
from tasks.model_api.inputs import InputKind, NonEmpty, png_base64, wav_base64
from tasks.model_api.pipelines import QuestionAnsweringPipeline, Seq2SeqPipeline

# --- parameters (validated; unknown names are 422s naming them) --------------------------------------


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateParams(Params):
    max_new_tokens: int = Field(32, ge=1, le=4096)
    do_sample: bool = False
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)


class TextGenerationParams(GenerateParams):
    return_full_text: bool = Field(False, description="include the prompt in generated_text")


class Seq2SeqParams(GenerateParams):
    num_beams: int | None = Field(None, ge=1, le=16)


class ClassifyParams(Params):
    top_k: int | None = Field(1, ge=1, description="labels per input (null: all)")
    function_to_apply: Literal["default", "sigmoid", "softmax", "none"] = "default"


class TokenParams(Params):
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] = "simple"
    ignore_labels: list[str] | None = None


class ZeroShotParams(Params):
    candidate_labels: list[NonEmpty] = Field(..., min_length=1, description="the labels to choose from")
    multi_label: bool = False
    hypothesis_template: str = "This example is {}."


class QAParams(Params):
    top_k: int = Field(1, ge=1, le=20)
    max_answer_len: int = Field(15, ge=1)
    handle_impossible_answer: bool = False


class FillMaskParams(Params):
    top_k: int = Field(5, ge=1, le=100)


class FeatureParams(Params):
    pooling: Literal["mean", "cls", "none"] = Field("mean", description="none: one vector per token")
    normalize: bool = Field(False, description="L2-normalise the pooled vector")


class ImageParams(Params):
    top_k: int = Field(5, ge=1)


class SpeechParams(Params):
    max_new_tokens: int | None = Field(None, ge=1, description="for sequence-to-sequence speech models (Whisper)")


# --- one result (the /docs response schema) ----------------------------------------------------------


class Result(BaseModel):
    model_config = ConfigDict(extra="allow")


class Generated(Result):
    generated_text: str


class Summary(Result):
    summary_text: str


class Label(Result):
    label: str
    score: float


class Entity(Result):
    entity_group: str | None = None
    entity: str | None = None
    score: float
    word: str
    start: int | None = None
    end: int | None = None


class ZeroShotResult(Result):
    sequence: str
    labels: list[str]
    scores: list[float]


class Answer(Result):
    answer: str
    score: float
    start: int
    end: int


class MaskFill(Result):
    score: float
    token: int
    token_str: str
    sequence: str


class Embedding(Result):
    embedding: list[float] | list[list[float]]


class Transcript(Result):
    text: str


# --- the row --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What a task's example and input checks need from the loaded pipeline."""

    mask_token: str | None = None
    sampling_rate: int = 16000


Runner = Callable[[Any, list[Any], dict[str, Any]], list[Any]]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    group: str
    summary: str
    input: InputKind
    params: type[Params]
    result: Any  # the type of one input's result
    run: Runner
    example: Callable[[ModelFacts], dict[str, Any]]
    auto_classes: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    pipeline_tags: tuple[str, ...] = ()
    #: exact architecture names or "*Suffix" patterns (exact names win over suffixes)
    architectures: tuple[str, ...] = ()
    needs_mask: bool = False
    batch_example: Callable[[ModelFacts], dict[str, Any]] | None = field(default=None)
    #: (model, tokenizer, max_input_tokens) -> pipeline, for tasks transformers has no pipeline for (5.x)
    own_pipeline: Callable[[Any, Any, int], Any] | None = None

    @property
    def title(self) -> str:
        return "".join(p.capitalize() for p in self.name.replace("-", " ").split())


def _kwargs(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def _lists(out: Any, n: int) -> list[Any]:
    """Per-input results whose single result is a list of dicts; the pipeline unwraps a batch of one."""
    if isinstance(out, dict):
        out = [out]
    if n == 1 and out and isinstance(out[0], dict):
        return [out]
    return [r if isinstance(r, list) else [r] for r in out]


def _dicts(out: Any) -> list[Any]:
    """Per-input results whose single result is one dict (generation: the first sequence)."""
    if isinstance(out, dict):
        out = [out]
    return [r[0] if isinstance(r, list) else r for r in out]


def run_text_generation(pipe: Any, items: list[Any], params: dict[str, Any]) -> list[Any]:
    kw = _kwargs(params)
    if not kw.get("do_sample"):
        kw = {k: v for k, v in kw.items() if k not in ("temperature", "top_k", "top_p")}
    return _dicts(pipe(items, batch_size=len(items), **kw))


def run_seq2seq(pipe: Any, items: list[Any], params: dict[str, Any]) -> list[Any]:
    kw = _kwargs(params)
    if not kw.get("do_sample"):
        kw = {k: v for k, v in kw.items() if k not in ("temperature", "top_k", "top_p")}
    return _dicts(pipe(items, batch_size=len(items), truncation=True, **kw))


def run_classify(pipe: Any, items: list[Any], params: dict[str, Any]) -> list[Any]:
    kw = dict(params)
    if kw.get("function_to_apply") == "default":
        kw.pop("function_to_apply")
    return _lists(pipe(items, batch_size=len(items), truncation=True, **kw), len(items))


def run_tokens(pipe: Any, items: list[Any], params: dict[str, Any]) -> list[Any]:
    return _lists(pipe(items, batch_size=len(items), **_kwargs(params)), len(items))


def run_zero_shot(pipe: Any, items: list[Any], params: dict[str, Any]) -> list[Any]:
    return _dicts(pipe(items, batch_size=len(items), **_kwargs(params)))


def run_qa(pipe: Any, items: list[Any], params: dict[str, Any]) -> list[Any]:
    out = pipe(
        question=[i["question"] for i in items],
        context=[i["context"] for i in items],
        batch_size=len(items),
        **_kwargs(params),
    )
    if isinstance(out, dict):
        out = [out]
    if params.get("top_k", 1) > 1 and len(items) == 1 and out and isinstance(out[0], dict):
        out = [out]
    return list(out)


def run_fill_mask(pipe: Any, items: list[Any], params: dict[str, Any]) -> list[Any]:
    return _lists(pipe(items, batch_size=len(items), **_kwargs(params)), len(items))


def run_features(pipe: Any, items: list[Any], params: dict[str, Any]) -> list[Any]:
    """Embeddings computed with the attention mask, so padding in a batch never changes a vector."""
    import torch

    tok, model = pipe.tokenizer, pipe.model
    enc = tok(items, padding=True, truncation=True, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state.float()
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooling = params.get("pooling", "mean")
    if pooling == "none":
        return [{"embedding": h[m[:, 0] > 0].tolist()} for h, m in zip(hidden, mask)]
    vec = hidden[:, 0] if pooling == "cls" else (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    if params.get("normalize"):
        vec = torch.nn.functional.normalize(vec, dim=-1)
    return [{"embedding": v.tolist()} for v in vec]


def run_image(pipe: Any, items: list[Any], params: dict[str, Any]) -> list[Any]:
    return _lists(pipe(items, batch_size=len(items), **_kwargs(params)), len(items))


def run_speech(pipe: Any, items: list[Any], params: dict[str, Any]) -> list[Any]:
    kw: dict[str, Any] = {}
    if params.get("max_new_tokens") and getattr(pipe, "type", "") == "seq2seq_whisper":
        kw["generate_kwargs"] = {"max_new_tokens": params["max_new_tokens"]}
    # the pipeline pops "raw" from each dict: give it copies, so a retried batch still has its audio
    return _dicts(pipe([dict(i) for i in items], batch_size=len(items), **kw))


_T = "text"
TASKS: Registry[TaskSpec] = Registry(
    "model API task",
    "task",
    contract=Contract(TaskSpec, run="run", unavailable=lambda spec: None, describe=lambda spec: spec.summary),
    entries=[
        TaskSpec(
            "text-generation",
            "text generation",
            "continue a prompt (causal LMs)",
            InputKind.TEXT,
            TextGenerationParams,
            Generated,
            run_text_generation,
            lambda f: {_T: "Once upon a time", "parameters": {"max_new_tokens": 16}},
            ("AutoModelForCausalLM",),
            pipeline_tags=("text-generation",),
            architectures=("*ForCausalLM", "*LMHeadModel"),
            batch_example=lambda f: {"texts": ["Once upon a time", "The weather today"]},
        ),
        TaskSpec(
            "text-classification",
            "classification",
            "labels with scores for a text",
            InputKind.TEXT,
            ClassifyParams,
            list[Label],
            run_classify,
            lambda f: {_T: "I really enjoyed this film."},
            ("AutoModelForSequenceClassification",),
            aliases=("sentiment-analysis",),
            pipeline_tags=("text-classification", "sentiment-analysis"),
            architectures=("*ForSequenceClassification",),
            batch_example=lambda f: {"texts": ["Great service.", "Never again."], "parameters": {"top_k": 2}},
        ),
        TaskSpec(
            "token-classification",
            "classification",
            "entities (named-entity recognition, part of speech) in a text",
            InputKind.TEXT,
            TokenParams,
            list[Entity],
            run_tokens,
            lambda f: {_T: "Ada Lovelace lived in London."},
            ("AutoModelForTokenClassification",),
            aliases=("ner",),
            pipeline_tags=("token-classification", "ner"),
            architectures=("*ForTokenClassification",),
        ),
        TaskSpec(
            "zero-shot-classification",
            "classification",
            "scores for labels given at request time (an NLI model)",
            InputKind.TEXT,
            ZeroShotParams,
            ZeroShotResult,
            run_zero_shot,
            lambda f: {_T: "The match ended 2-1.", "parameters": {"candidate_labels": ["sports", "politics"]}},
            ("AutoModelForSequenceClassification",),
            pipeline_tags=("zero-shot-classification",),
        ),
        TaskSpec(
            "question-answering",
            "question answering",
            "the span of a context that answers a question",
            InputKind.QA,
            QAParams,
            Answer | list[Answer],
            run_qa,
            lambda f: {"question": "Where did Ada live?", "context": "Ada Lovelace lived in London."},
            ("AutoModelForQuestionAnswering",),
            pipeline_tags=("question-answering",),
            architectures=("*ForQuestionAnswering",),
            batch_example=lambda f: {
                "inputs": [
                    {"question": "Who?", "context": "Ada wrote it."},
                    {"question": "When?", "context": "In 1843."},
                ]
            },
            own_pipeline=QuestionAnsweringPipeline,
        ),
        TaskSpec(
            "summarization",
            "sequence to sequence",
            "a shorter text (encoder-decoder models)",
            InputKind.TEXT,
            Seq2SeqParams,
            Summary,
            run_seq2seq,
            lambda f: {_T: "A long article about the history of computing ...", "parameters": {"max_new_tokens": 16}},
            ("AutoModelForSeq2SeqLM",),
            pipeline_tags=("summarization",),
            own_pipeline=lambda model, tok, n: Seq2SeqPipeline(model, tok, "summary_text", n),
        ),
        TaskSpec(
            "text2text-generation",
            "sequence to sequence",
            "text to text: translation, rewriting, instructions (T5, BART)",
            InputKind.TEXT,
            Seq2SeqParams,
            Generated,
            run_seq2seq,
            lambda f: {_T: "translate English to German: Hello", "parameters": {"max_new_tokens": 16}},
            ("AutoModelForSeq2SeqLM",),
            pipeline_tags=("text2text-generation", "translation"),
            architectures=(
                "T5ForConditionalGeneration",
                "MT5ForConditionalGeneration",
                "BartForConditionalGeneration",
                "MBartForConditionalGeneration",
                "PegasusForConditionalGeneration",
                "MarianMTModel",
            ),
            own_pipeline=lambda model, tok, n: Seq2SeqPipeline(model, tok, "generated_text", n),
        ),
        TaskSpec(
            "fill-mask",
            "masks and features",
            "the likeliest tokens for the mask token in a text",
            InputKind.TEXT,
            FillMaskParams,
            list[MaskFill],
            run_fill_mask,
            lambda f: {_T: f"Paris is the {f.mask_token or '[MASK]'} of France."},
            ("AutoModelForMaskedLM",),
            pipeline_tags=("fill-mask",),
            architectures=("*ForMaskedLM",),
            needs_mask=True,
        ),
        TaskSpec(
            "feature-extraction",
            "masks and features",
            "embeddings (pooled, or one vector per token)",
            InputKind.TEXT,
            FeatureParams,
            Embedding,
            run_features,
            lambda f: {_T: "An example sentence to embed."},
            ("AutoModel",),
            pipeline_tags=("feature-extraction", "sentence-similarity"),
            architectures=("BertModel", "RobertaModel", "XLMRobertaModel", "DistilBertModel", "MPNetModel"),
        ),
        TaskSpec(
            "image-classification",
            "images",
            "labels with scores for an image",
            InputKind.IMAGE,
            ImageParams,
            list[Label],
            run_image,
            lambda f: {"image": png_base64()},
            ("AutoModelForImageClassification",),
            pipeline_tags=("image-classification",),
            architectures=("*ForImageClassification",),
        ),
        TaskSpec(
            "automatic-speech-recognition",
            "speech",
            "the transcript of a recording (CTC models, Whisper)",
            InputKind.AUDIO,
            SpeechParams,
            Transcript,
            run_speech,
            lambda f: {"audio": wav_base64(rate=f.sampling_rate)},
            ("AutoModelForCTC", "AutoModelForSpeechSeq2Seq"),
            pipeline_tags=("automatic-speech-recognition",),
            architectures=("*ForCTC", "WhisperForConditionalGeneration", "*ForSpeechSeq2Seq"),
        ),
    ],
)
ALIASES: dict[str, str] = {a: t.name for t in TASKS.values() for a in (t.name, *t.aliases)}


def canonical_task(name: str) -> str:
    """The task's own name for a name or alias (sentiment-analysis -> text-classification); unknown: ValueError."""
    if name in ALIASES:
        return ALIASES[name]
    return TASKS.check(name)


def task(name: str) -> TaskSpec:
    return TASKS.lookup(ALIASES.get(name, name))


def _matches(arch: str, pattern: str) -> bool:
    return arch.endswith(pattern[1:]) if pattern.startswith("*") else arch == pattern


def infer_task(config: dict[str, Any], pipeline_tag: str | None, model: str) -> str:
    """The task from the model card's `pipeline_tag`, else from config.json's `architectures` (exact names
    before suffixes); neither: a PermanentError that names the choices."""
    if pipeline_tag and pipeline_tag in ALIASES:
        return ALIASES[pipeline_tag]
    archs = [str(a) for a in config.get("architectures") or []]
    for exact in (True, False):
        for spec in TASKS.values():
            for pattern in spec.architectures:
                if pattern.startswith("*") != exact and any(_matches(a, pattern) for a in archs):
                    return spec.name
    raise PermanentError(
        f"cannot infer the task of {model} (pipeline_tag: {pipeline_tag or 'none'}, architectures: {archs or 'none'})",
        hint=f"pass --task, one of: {', '.join(ALIASES)}",
    )
