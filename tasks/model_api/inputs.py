"""Request bodies of `POST /predict`, by input kind, and the decoding/checking of what they carry.

One server serves one task, so its `/predict` body is the task's own model (built here from the task
row): `/docs` then shows exactly the fields that task takes, with examples, and FastAPI's validation turns
a wrong field into a 422 naming it. What pydantic cannot check alone (a batch over max_batch_size, input
over max_input_tokens, a missing mask token, an image or audio that does not decode) raises `InputError`
with the field's location, answered as a 422 of the same shape.
"""

from __future__ import annotations

import base64
import binascii
import io
import wave
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, model_validator


class InputKind(StrEnum):
    TEXT = "text"
    QA = "question-answering"
    IMAGE = "image"
    AUDIO = "audio"


class InputError(Exception):
    """Bad input for the task: `loc` is the field's path in the body (("texts", 3)), `msg` says what is wrong."""

    def __init__(self, loc: tuple[str | int, ...], msg: str):
        super().__init__(f"{'.'.join(str(p) for p in loc)}: {msg}")
        self.loc = loc
        self.msg = msg

    def detail(self) -> list[dict[str, Any]]:
        """FastAPI's 422 `detail` shape, so clients parse one format for every bad input."""
        return [{"loc": ["body", *self.loc], "msg": self.msg, "type": "value_error"}]


def _non_empty(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    return v


NonEmpty = Annotated[str, AfterValidator(_non_empty)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QAItem(Strict):
    question: NonEmpty
    context: NonEmpty


#: Per input kind: the single-input fields, and the batch field.
FIELDS: dict[InputKind, tuple[tuple[str, ...], str]] = {
    InputKind.TEXT: (("text",), "texts"),
    InputKind.QA: (("question", "context"), "inputs"),
    InputKind.IMAGE: (("image",), "images"),
    InputKind.AUDIO: (("audio",), "audios"),
}


def request_model(title: str, kind: InputKind, params: type[BaseModel], examples: list[dict[str, Any]]) -> type:
    """The pydantic body model of one task's /predict: its single fields or its batch field, and `parameters`."""
    single, batch = FIELDS[kind]
    fields: dict[str, Any] = {}
    if kind is InputKind.QA:
        fields["question"] = (NonEmpty | None, Field(None, description="the question"))
        fields["context"] = (NonEmpty | None, Field(None, description="the text the answer is taken from"))
        fields["inputs"] = (list[QAItem] | None, Field(None, min_length=1, description="a batch of questions"))
    elif kind is InputKind.TEXT:
        fields["text"] = (NonEmpty | None, Field(None, description="one input"))
        fields["texts"] = (list[NonEmpty] | None, Field(None, min_length=1, description="a batch of inputs"))
    else:
        what = "an image file (PNG, JPEG, ...)" if kind is InputKind.IMAGE else "a WAV file"
        fields[single[0]] = (NonEmpty | None, Field(None, description=f"{what}, base64-encoded"))
        fields[batch] = (list[NonEmpty] | None, Field(None, min_length=1, description=f"a batch: {what}s, base64"))
    required = any(f.is_required() for f in params.model_fields.values())
    fields["parameters"] = (
        (params, Field(..., description="pipeline parameters (required for this task)"))
        if required
        else (params | None, Field(None, description="pipeline parameters"))
    )

    def one_input(self: Any) -> Any:
        given_single = [f for f in single if getattr(self, f) is not None]
        given_batch = getattr(self, batch) is not None
        if given_batch and given_single:
            raise ValueError(f"send either {' + '.join(single)} or {batch}, not both")
        if not given_batch and len(given_single) != len(single):
            missing = [f for f in single if getattr(self, f) is None]
            raise ValueError(
                f"missing {', '.join(missing)}: send {' + '.join(single)} (one input) or {batch} (a batch)"
            )
        return self

    return create_model(
        f"{title}Request",
        __base__=_examples_base(examples),
        __validators__={"_one_input": model_validator(mode="after")(one_input)},
        **fields,
    )


def _examples_base(examples: list[dict[str, Any]]) -> type[BaseModel]:
    """A strict base carrying the task's examples into the JSON schema (and so into /docs)."""

    class WithExamples(Strict):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": examples})

    return WithExamples


@dataclass
class Batch:
    """A request's inputs as the pipeline takes them, where each came from, and whether it was a batch."""

    items: list[Any]
    locs: list[tuple[str | int, ...]]
    batched: bool


def raw_inputs(body: BaseModel, kind: InputKind) -> Batch:
    """The inputs of a validated body, in order, with their field locations."""
    single, batch = FIELDS[kind]
    many = getattr(body, batch)
    if many is not None:
        items = [m.model_dump() if isinstance(m, BaseModel) else m for m in many]
        return Batch(items, [(batch, i) for i in range(len(items))], True)
    if kind is InputKind.QA:
        return Batch([{"question": body.question, "context": body.context}], [("question",)], False)  # type: ignore[attr-defined]
    return Batch([getattr(body, single[0])], [(single[0],)], False)


# --- decoding ---------------------------------------------------------------------------------------


def _b64(data: str, loc: tuple[str | int, ...]) -> bytes:
    if data.startswith("data:") and "," in data:  # a data URL: data:image/png;base64,....
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(loc, f"not valid base64 ({exc})")


def decode_image(data: str, loc: tuple[str | int, ...]) -> Any:
    """A PIL image in RGB; anything PIL cannot read is an InputError naming the field."""
    from PIL import Image, UnidentifiedImageError

    raw = _b64(data, loc)
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(loc, f"cannot decode the image ({type(exc).__name__}: {exc})")
    return img.convert("RGB")


def decode_audio(data: str, loc: tuple[str | int, ...], sampling_rate: int) -> dict[str, Any]:
    """A WAV file (PCM 8/16/32-bit, any channels and rate) as mono float32 at the model's sampling rate.

    The standard library reads WAV, so speech works without ffmpeg; resampling is linear interpolation,
    which is enough for a feature extractor's log-mel or raw-waveform input."""
    import numpy as np

    raw = _b64(data, loc)
    try:
        with wave.open(io.BytesIO(raw)) as w:
            width, channels, rate, frames = w.getsampwidth(), w.getnchannels(), w.getframerate(), w.getnframes()
            pcm = w.readframes(frames)
    except (wave.Error, EOFError) as exc:
        raise InputError(loc, f"cannot decode the audio: send a base64 WAV file ({exc})")
    dtypes = {1: np.uint8, 2: np.int16, 4: np.int32}
    if width not in dtypes or not pcm:
        raise InputError(loc, f"cannot decode the audio: {8 * width}-bit WAV with {frames} frames is not supported")
    x = np.frombuffer(pcm, dtype=dtypes[width]).astype(np.float32)
    x = (x - 128.0) / 128.0 if width == 1 else x / float(2 ** (8 * width - 1))
    x = x.reshape(-1, channels).mean(axis=1)
    if rate != sampling_rate:
        n = max(1, int(round(len(x) * sampling_rate / rate)))
        x = np.interp(np.linspace(0, len(x) - 1, n), np.arange(len(x)), x).astype(np.float32)
    return {"raw": x, "sampling_rate": sampling_rate}


def wav_base64(seconds: float = 0.5, rate: int = 16000, freq: float = 440.0) -> str:
    """A sine tone as a base64 WAV: the ready check's and /docs' example input for speech."""
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return base64.b64encode(buf.getvalue()).decode()


def png_base64(size: int = 32, color: tuple[int, int, int] = (200, 30, 30)) -> str:
    """A plain square PNG as base64: the ready check's and /docs' example input for images."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
