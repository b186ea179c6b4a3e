"""Stage 11 for a speech model: word error rate of the merged model on eval samples that carry audio.

A speech recognition model (wav2vec2/CTC, Whisper) has no GGUF to compare: llama.cpp cannot convert it.
What says whether the fine-tune is good is its word error rate on recordings with known transcripts. The
eval samples (`evaluation.samples`, JSONL) are one `{"audio": ..., "reference": ...}` per line (optional
`id`): `audio` is a WAV file's path relative to the samples file, or the WAV itself as base64 (a
`data:audio/wav;base64,` prefix is allowed). The merged model is loaded and run exactly as the model API
serves it (tasks/model_api/loading.py, the task row's runner; WAV decoding and resampling from
tasks/model_api/inputs.py), so the number describes what the transformers engine and the Space answer.

WER and CER come from `jiwer` (the library the speech community reports with), over the whole set
(errors summed, divided by the reference words summed), after the same normalisation of reference and
hypothesis: lower case, punctuation dropped (apostrophes inside words kept), whitespace collapsed. A
CTC model's vocabulary has no capitals or punctuation, so without that a perfect transcript would still
score errors.

The report (reports/eval/: eval.json, eval.md) is the `report:eval` artifact like the GGUF evaluation's;
`meta.quants.merged` holds {wer, cer, substitutions, deletions, insertions, words, latency_p50_ms,
latency_p95_ms, audio_s, real_time_factor}: the card's evaluation table and the merged repo's
model-index (metric type `wer`) read it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import gc
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_dir
from tasks.core.errors import PermanentError
from tasks.core.hashing import digest_of
from tasks.core.progress import Progress
from tasks.core.stage import stage_task
from tasks.core.ui import artifact_key, publish_table
from tasks.core.vocab import ArtifactKind, Stage
from tasks.evaluate.evaluation import EvalSettings

STAGE = Stage.EVALUATE
SPEECH_TASK = "automatic-speech-recognition"
log = logging.getLogger("loraship.evaluate")
_DATA_URI = re.compile(r"^data:audio/[\w.+-]+;base64,")
SAMPLE_HINT = (
    '{"audio": "clips/one.wav", "reference": "the words spoken"} (audio: a WAV path relative to the file, or base64)'
)


class AudioSample(BaseModel):
    """One line of a speech eval file, its audio resolved to the WAV's bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    reference: str = Field(min_length=1)
    wav: bytes = Field(repr=False)
    source: str  # the path, or "base64", for the report


def normalize_transcript(text: str) -> str:
    """Lower case, punctuation dropped (apostrophes inside words kept: "don't"), whitespace collapsed."""
    text = re.sub(r"[^\w\s']|_", " ", text.lower())
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)
    return " ".join(text.split())


def word_error_rate(references: list[str], hypotheses: list[str]) -> dict[str, Any]:
    """Corpus WER and CER (jiwer) of `hypotheses` against `references`, both normalised first.

    WER = (substitutions + deletions + insertions) / reference words, summed over the set; it is above 1
    when a model inserts more words than the references have. An empty hypothesis is all deletions."""
    import jiwer

    if len(references) != len(hypotheses) or not references:
        raise ValueError(f"{len(references)} references for {len(hypotheses)} hypotheses")
    refs = [normalize_transcript(r) for r in references]
    empty = [i for i, r in enumerate(refs) if not r]
    if empty:
        raise ValueError(f"references {empty} have no words after normalisation")
    hyps = [normalize_transcript(h) for h in hypotheses]
    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters(refs, hyps)
    return {
        "wer": float(words.wer),
        "cer": float(chars.cer),
        "substitutions": int(words.substitutions),
        "deletions": int(words.deletions),
        "insertions": int(words.insertions),
        "words": int(words.hits + words.substitutions + words.deletions),
    }


def _wav_bytes(audio: str, folder: Path, where: str) -> tuple[bytes, str]:
    path = (folder / audio).expanduser() if len(audio) < 4096 else None
    if path is not None and path.is_file():
        return path.read_bytes(), str(path)
    try:
        raw = base64.b64decode(_DATA_URI.sub("", audio), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if raw[:4] != b"RIFF":
        raise PermanentError(
            f"{where}: audio {audio[:60]!r} is neither a file (relative to {folder}) nor a base64 WAV",
            hint=SAMPLE_HINT,
        )
    return raw, "base64"


def load_audio_samples(settings: EvalSettings) -> list[AudioSample]:
    """The eval samples of a speech model; every line needs audio and a reference transcript."""
    if not settings.samples:
        raise PermanentError(
            "a speech model is evaluated on recordings with transcripts, and evaluation.samples is not set",
            hint=f"point evaluation.samples at a JSONL file with one {SAMPLE_HINT} per line",
        )
    path = Path(settings.samples).expanduser()
    if not path.is_file():
        raise PermanentError(f"evaluation.samples {path} does not exist", hint=SAMPLE_HINT)
    out: list[AudioSample] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise PermanentError(f"{where}: not JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("audio"), str):
            raise PermanentError(f'{where}: a speech model\'s eval sample needs an "audio" string', hint=SAMPLE_HINT)
        wav, source = _wav_bytes(row["audio"], path.parent, where)
        try:
            sample = AudioSample(id=str(row.get("id") or n), reference=row.get("reference"), wav=wav, source=source)
        except ValidationError:
            raise PermanentError(f'{where}: needs a non-empty "reference" transcript', hint=SAMPLE_HINT) from None
        if not normalize_transcript(sample.reference):
            raise PermanentError(f"{where}: the reference {sample.reference!r} has no words", hint=SAMPLE_HINT)
        out.append(sample)
    if not out:
        raise PermanentError(f"evaluation.samples {path} has no samples", hint=SAMPLE_HINT)
    return out


def data_digest(settings: EvalSettings) -> str:
    """Digest of the samples with their audio's contents (the cache key: a path alone is not)."""
    return digest_of([[s.id, s.reference, hashlib.sha256(s.wav).hexdigest()] for s in load_audio_samples(settings)])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `n` (None: left alone) for the block, then restored: on a machine
    whose cores are busy with other work, every small op of a tiny model waits for its thread pool (a
    random Whisper's transcript took 9 s with 2 threads under load, 0.2 s with 1)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def transcribe(model_dir: Path, samples: list[AudioSample], threads: int | None = None) -> list[dict[str, Any]]:
    """Each sample's transcript, its latency and audio length, from the model loaded as the model API does."""
    with _torch_threads(threads):
        return _transcribe(model_dir, samples)


def _transcribe(model_dir: Path, samples: list[AudioSample]) -> list[dict[str, Any]]:
    from tasks.model_api.inputs import InputError, decode_audio
    from tasks.model_api.loading import load
    from tasks.model_api.settings import Device, DType
    from tasks.model_api.tasks_table import TASKS

    spec = TASKS.lookup(SPEECH_TASK)
    loaded = load(spec, str(model_dir), Device.AUTO, DType.AUTO)
    rate = loaded.facts.sampling_rate
    out = []
    try:
        with Progress("transcribe eval samples", len(samples), unit="sample") as progress:
            for s in samples:
                try:
                    audio = decode_audio(base64.b64encode(s.wav).decode(), ("audio",), rate)
                except InputError as exc:
                    raise PermanentError(f"eval sample {s.id} ({s.source}): {exc.msg}") from None
                seconds = len(audio["raw"]) / rate
                t0 = time.perf_counter()
                result = spec.run(loaded.pipe, [audio], {})[0]
                ms = (time.perf_counter() - t0) * 1000
                out.append({"text": str(result.get("text") or ""), "latency_ms": ms, "audio_s": seconds})
                progress.advance(1)
    finally:
        del loaded
        gc.collect()
    return out


def to_markdown(model: str, row: dict[str, Any], per_sample: list[dict[str, Any]]) -> str:
    lines = [
        f"# Evaluation of {model} (speech recognition)",
        "",
        f"Word error rate **{row['wer']:.4g}** and character error rate {row['cer']:.4g} on {len(per_sample)} "
        f"recordings ({row['words']} reference words: {row['substitutions']} substituted, {row['deletions']} "
        f"deleted, {row['insertions']} inserted); transcripts and references lower-cased, punctuation dropped.",
        f"Latency p50 {row['latency_p50_ms']:.0f} ms, p95 {row['latency_p95_ms']:.0f} ms; "
        f"{row['real_time_factor']:.3g}x real time over {row['audio_s']:.1f} s of audio.",
        "",
        "| sample | WER | reference | transcript |",
        "| --- | ---: | --- | --- |",
    ]
    for s in per_sample:
        cells = [s["id"], f"{s['wer']:.3g}", s["reference"], s["hypothesis"] or "(empty)"]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate_speech(merged: Artifact, settings: EvalSettings, out_dir: Path, model: str) -> Artifact:
    """Transcribe every sample with the merged model, score WER/CER, write out_dir/{eval.json,eval.md}."""
    if not merged.local_path.is_dir():
        raise PermanentError(f"the merged model {merged.local_path} is missing", hint="run the merge stage")
    samples = load_audio_samples(settings)
    heard = transcribe(merged.local_path, samples, settings.threads)
    refs, hyps = [s.reference for s in samples], [h["text"] for h in heard]
    scores = word_error_rate(refs, hyps)
    per_sample = [
        {
            "id": s.id,
            "audio": s.source,
            "reference": s.reference,
            "hypothesis": h["text"],
            "wer": word_error_rate([s.reference], [h["text"]])["wer"],
            "latency_ms": round(h["latency_ms"], 1),
            "audio_s": round(h["audio_s"], 3),
        }
        for s, h in zip(samples, heard)
    ]
    latencies = [h["latency_ms"] for h in heard]
    audio_s = sum(h["audio_s"] for h in heard)
    row = {
        **{k: round(v, 6) if isinstance(v, float) else v for k, v in scores.items()},
        "latency_p50_ms": round(_percentile(latencies, 0.5), 1),
        "latency_p95_ms": round(_percentile(latencies, 0.95), 1),
        "audio_s": round(audio_s, 3),
        "real_time_factor": round(sum(latencies) / 1000 / audio_s, 4) if audio_s else None,
    }
    measured_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    report = {
        "model": model,
        "kind": "speech",
        "measured_at": measured_at,
        "quants": {"merged": row},
        "samples": per_sample,
        "settings": settings.model_dump(mode="json"),
        "note": "WER and CER by jiwer after lower-casing and dropping punctuation; latencies one sample at a time",
    }
    md = to_markdown(model, row, per_sample) + f"\nMeasured {measured_at}.\n"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)
        (tmp / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "eval.md").write_text(md)
    publish_table(artifact_key("eval", model), [{"model": "merged", **row}], f"Word error rate of {model}")
    log.info("evaluate: WER %.4g, CER %.4g on %d samples", row["wer"], row["cer"], len(samples))
    return Artifact.from_path(
        out_dir,
        name="report:eval",
        kind=ArtifactKind.REPORT,
        stage=STAGE,
        inputs=[merged],
        settings=settings,
        tools=["transformers", "jiwer"],
        meta={
            "kind": "speech",
            "quants": {"merged": row},
            "wer": row["wer"],
            "measured_at": measured_at,
            "samples": len(samples),
            "json": str(out_dir / "eval.json"),
            "markdown": str(out_dir / "eval.md"),
        },
    )


@stage_task(STAGE)
def evaluate_speech_task(
    merged: Artifact, settings: EvalSettings, out_dir: Path, model: str, data_digest: str
) -> Artifact:
    """`data_digest` (of the samples and their audio) is only there to key the cache on their content."""
    return evaluate_speech(merged, settings, out_dir, model)
