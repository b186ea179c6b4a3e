"""Word error rate for speech models (tasks/evaluate/speech.py): the metric on known pairs, the eval
samples that carry audio (a path relative to the file, or base64), and the merged model scored and
written where the card's model-index reads it."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tasks.core.errors import PermanentError
from tasks.evaluate.evaluation import EvalSettings
from tasks.evaluate.speech import load_audio_samples, normalize_transcript, word_error_rate


@pytest.mark.parametrize(
    ("refs", "hyps", "wer", "counts"),
    [
        (["the cat sat"], ["the cat sat"], 0.0, (0, 0, 0)),
        (["the cat sat"], ["the cat sat down"], 1 / 3, (0, 0, 1)),  # one insertion over three words
        (["the cat sat"], ["the bat sat"], 1 / 3, (1, 0, 0)),
        (["hello world"], [""], 1.0, (0, 2, 0)),  # nothing heard: every word deleted
        (["a b"], ["x y z w"], 2.0, (2, 0, 2)),  # more errors than words: above 1
        # over the set: (1 substitution + 1 deletion) / 5 reference words, not the mean of 0.5 and 1/3
        (["a b", "c d e"], ["a x", "c d"], 0.4, (1, 1, 0)),
        (["Hello, World!"], ["hello world"], 0.0, (0, 0, 0)),  # case and punctuation are normalised away
        (["don't stop"], ["dont stop"], 0.5, (1, 0, 0)),  # an apostrophe inside a word is part of it
    ],
)
def test_word_error_rate_on_known_pairs(refs, hyps, wer, counts):
    got = word_error_rate(refs, hyps)
    assert got["wer"] == pytest.approx(wer)
    assert (got["substitutions"], got["deletions"], got["insertions"]) == counts
    assert got["words"] == sum(len(normalize_transcript(r).split()) for r in refs)


def test_character_error_rate_and_bad_input():
    assert word_error_rate(["abcd"], ["abed"])["cer"] == pytest.approx(0.25)
    assert normalize_transcript("  'Quoted' _words_, OK?  ") == "quoted words ok"
    with pytest.raises(ValueError, match="no words"):
        word_error_rate(["?!"], ["anything"])
    with pytest.raises(ValueError, match="1 references for 2"):
        word_error_rate(["a"], ["a", "b"])


def _wav() -> bytes:
    from tasks.model_api.inputs import wav_base64

    return base64.b64decode(wav_base64(seconds=0.2))


def _samples(tmp_path: Path, rows: list[dict]) -> EvalSettings:
    path = tmp_path / "eval" / "samples.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return EvalSettings(samples=str(path))


def test_audio_samples_from_a_relative_path_or_base64(tmp_path):
    wav = _wav()
    (tmp_path / "eval" / "clips").mkdir(parents=True)
    (tmp_path / "eval" / "clips" / "a.wav").write_bytes(wav)
    b64 = base64.b64encode(wav).decode()
    settings = _samples(
        tmp_path,
        [
            {"audio": "clips/a.wav", "reference": "one"},
            {"id": "inline", "audio": b64, "reference": "two"},
            {"audio": "data:audio/wav;base64," + b64, "reference": "three"},
        ],
    )
    got = load_audio_samples(settings)
    assert [(s.id, s.reference) for s in got] == [("1", "one"), ("inline", "two"), ("3", "three")]
    assert all(s.wav == wav for s in got)
    assert got[0].source == str(tmp_path / "eval" / "clips" / "a.wav") and got[1].source == "base64"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"audio": "missing.wav", "reference": "x"}, "neither a file .* nor a base64 WAV"),
        ({"audio": base64.b64encode(b"not a wav").decode(), "reference": "x"}, "nor a base64 WAV"),
        ({"prompt": "hi", "reference": "x"}, 'needs an "audio" string'),
        ({"audio": "clip.wav"}, 'non-empty "reference"'),
        ({"audio": "clip.wav", "reference": "..."}, "has no words"),
    ],
)
def test_bad_audio_samples_say_which_line(tmp_path, row, message):
    settings = _samples(tmp_path, [row])
    (tmp_path / "eval" / "clip.wav").write_bytes(_wav())
    with pytest.raises(PermanentError, match=message) as err:
        load_audio_samples(settings)
    assert "samples.jsonl:1" in str(err.value)


def test_no_samples_for_a_speech_model_says_what_to_set():
    with pytest.raises(PermanentError, match="evaluation.samples is not set"):
        load_audio_samples(EvalSettings())


def test_merged_speech_model_scored_into_the_report_and_the_card(tmp_path):
    """The tiny wav2vec2 (as the model API loads it) transcribes two WAVs; the report's quants.merged
    holds WER/CER/latency, and the merged repo's card carries the WER in its model-index."""
    from huggingface_hub import ModelCard

    from tasks.core.artifacts import Artifact
    from tasks.core.vocab import ArtifactKind
    from tasks.evaluate.speech import evaluate_speech
    from tasks.publish.card import CardSettings, build_card
    from tasks.support.tiny_models import copy_tree
    from tasks.support.tiny_task_models import tiny_wav2vec2

    merged_dir = copy_tree(tiny_wav2vec2(blank_bias=-10.0), tmp_path / "merged")
    merged = Artifact.from_path(merged_dir, name="merged", kind=ArtifactKind.MERGED, stage="merge")
    b64 = base64.b64encode(_wav()).decode()
    settings = _samples(tmp_path, [{"audio": b64, "reference": "a tone"}, {"audio": b64, "reference": "again"}])
    report = evaluate_speech(merged, settings, tmp_path / "reports" / "eval", "tinyasr")
    row = report.meta["quants"]["merged"]
    data = json.loads((tmp_path / "reports" / "eval" / "eval.json").read_text())
    assert data["quants"]["merged"] == row and report.meta["wer"] == row["wer"] and report.meta["samples"] == 2
    hyps = [s["hypothesis"] for s in data["samples"]]
    assert all(h.strip() for h in hyps), "blank biased down: the transcript is never empty"
    assert row["wer"] == pytest.approx(word_error_rate(["a tone", "again"], hyps)["wer"], abs=1e-6)
    assert row["words"] == 3 and row["latency_p95_ms"] >= row["latency_p50_ms"] > 0
    assert row["audio_s"] == pytest.approx(0.4, abs=0.01)
    assert "word error rate" in (tmp_path / "reports" / "eval" / "eval.md").read_text().lower()
    text = build_card(
        [],
        model_name="tinyasr",
        version="v1",
        repo_id="alice/tinyasr",
        settings=CardSettings(pipeline_tag="automatic-speech-recognition"),
        base_model="acme/wav2vec2-base",
        eval_report=report,
        kind="merged",
    )
    card = ModelCard(text)
    results = {r.metric_type: (r.metric_value, r.task_type) for r in card.data.eval_results}
    assert results["wer"] == (pytest.approx(row["wer"]), "automatic-speech-recognition")
    assert results["cer"][0] == pytest.approx(row["cer"])
