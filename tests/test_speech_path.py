"""The speech path through the pipeline: a tiny wav2vec2 CTC model and a tiny Whisper, each fine-tuned with
LoRA, go through download, merge (architecture-independent), serve (transformers engine) and health (its
model API, with a WAV), evaluate (word error rate on recordings made with espeak-ng), the merged repo on
the test Hub with the WER in its card's model-index, and the asr Space; the GGUF stages skip with the
reason (llama.cpp cannot convert the architecture)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.prefect]
TOKEN_ENV = "LORASHIP_TEST_SPEECH_TOKEN"


def speech_eval_samples(folder: Path) -> Path:
    """Two recordings spoken by espeak-ng: one as a WAV beside the JSONL (a relative path), one inline as
    base64, each with its reference transcript (capitals and punctuation as people write them)."""
    from tests.asr_models import espeak_wav

    espeak_wav("Hello world.", folder / "clips" / "hello.wav")
    fox = espeak_wav("The quick brown fox.", folder / "fox.wav").read_bytes()
    rows = [
        {"id": "hello", "audio": "clips/hello.wav", "reference": "Hello, world!"},
        {"id": "fox", "audio": base64.b64encode(fox).decode(), "reference": "The quick brown fox."},
    ]
    path = folder / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _card(repo_id: str, hub_server, tmp_path: Path):
    """The repo's README read back from the test Hub with huggingface_hub and parsed as a model card."""
    from huggingface_hub import ModelCard, hf_hub_download

    path = hf_hub_download(
        repo_id, "README.md", endpoint=hub_server.url, token="hf_read_alice", cache_dir=str(tmp_path / "dl")
    )
    return ModelCard(Path(path).read_text())


# (model name, base builder, LoRA builder in tests/asr_models.py, architecture, files of its processor)
CASES = {
    "wav2vec2": ("tinyasr", "tiny_wav2vec2", "tiny_wav2vec2_lora", "Wav2Vec2ForCTC", {"vocab.json"}),
    "whisper": (
        "tinywhisper",
        "tiny_whisper",
        "tiny_whisper_lora",
        "WhisperForConditionalGeneration",
        {"vocab.json", "merges.txt", "generation_config.json"},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_speech_model_to_merged_repo_card_and_asr_space(case, tmp_path, hub_server, prefect_api, monkeypatch):
    from flows.full import full
    from tasks.evaluate.speech import word_error_rate
    from tasks.publish.space_smoke import example_input, smoke_test
    from tasks.publish.space_templates import SPACE_TEMPLATES
    from tests import asr_models
    from tests.space_apps import launched

    name, base_of, lora_of, arch, processor_files = CASES[case]
    monkeypatch.setenv(TOKEN_ENV, "hf_write_alice")
    monkeypatch.setenv("LORASHIP_HOME", str(tmp_path / "home"))  # the transformers engine's deployments registry
    base, adapter = getattr(asr_models, base_of)(), getattr(asr_models, lora_of)()
    samples = speech_eval_samples(tmp_path / "eval")
    cfg = {
        "model": {"name": name, "version": "v1", "base_model": str(base)},
        "source": {"kind": "local", "path": str(adapter)},
        "merge": {"base_model": str(base)},
        "hub": {"token": f"env:{TOKEN_ENV}", "endpoint": hub_server.url, "repos": ["merged"]},
        # max_tokens: the tiny Whisper has 64 target positions (a real one 448; the Space's default is 256)
        "space": {"poll_interval": 0.05, "smoke_test": False, "max_tokens": 32},
        # one torch thread: on a busy 2-core machine each small op of a tiny model otherwise waits for its pool
        "serving": {"engine": "transformers", "threads": 1},
        "evaluation": {"samples": str(samples), "threads": 1},
        "pipeline": {"runs_dir": str(tmp_path / "runs")},
    }
    state = full(
        config=cfg,
        only=["download", "merge", "convert", "quantize", "serve", "health", "evaluate", "hub_push", "card", "space"],
        return_state=True,
    )
    assert state.is_completed(), state.message
    outcomes = {o.stage: (str(o.status), o.message) for o in state.result().stages}
    assert outcomes["merge"][0] == "done" and f"{arch} is checked per tensor only" in outcomes["merge"][1]
    assert outcomes["convert"] == ("skipped", outcomes["convert"][1])
    assert f"cannot convert the architecture {arch}" in outcomes["convert"][1]
    assert outcomes["quantize"][0] == "skipped" and "no GGUF to quantize" in outcomes["quantize"][1]
    assert {s: outcomes[s][0] for s in ("serve", "health", "evaluate", "hub_push", "card", "space")} == dict.fromkeys(
        ("serve", "health", "evaluate", "hub_push", "card", "space"), "done"
    ), outcomes
    reports = tmp_path / "runs" / name / "v1" / "reports"
    # served by the transformers engine as a speech recognition model API, health-checked through it: /health,
    # /info's task, and a real /predict with the bundled espeak-ng WAV, its transcript length and latency kept
    health = json.loads((reports / "health" / "health.json").read_text())
    assert health["verdict"] == "healthy" and health["engine"] == "transformers", health["reasons"]
    checks = {(c["group"], c["name"]): c for c in health["checks"]}
    assert checks[("api", "health")]["status"] == "pass"
    assert checks[("api", "info")]["task"] == "automatic-speech-recognition"
    predict = checks[("model", "audio: en_hello.wav")]
    assert predict["status"] == "pass" and predict["answer_chars"] > 0 and predict["latency_s"] > 0
    assert health["summary"]["mean_answer_chars"] == predict["answer_chars"]
    # evaluated by word error rate on the recordings, both sources of audio (a relative path, base64)
    report = json.loads((reports / "eval" / "eval.json").read_text())
    wer = report["quants"]["merged"]["wer"]
    assert [s["id"] for s in report["samples"]] == ["hello", "fox"]
    assert report["samples"][0]["audio"].endswith("clips/hello.wav") and report["samples"][1]["audio"] == "base64"
    hyps = [s["hypothesis"] for s in report["samples"]]
    assert wer == pytest.approx(word_error_rate(["Hello, world!", "The quick brown fox."], hyps)["wer"], abs=1e-6)
    assert wer > 0 and report["quants"]["merged"]["words"] == 6  # random weights do not transcribe English
    assert "WER" in outcomes["evaluate"][1]
    # the merged repo as transformers expects it, no GGUF repo
    assert sorted(hub_server.state.repos) == [("model", f"alice/{name}"), ("space", f"alice/{name}-demo")]
    model = hub_server.state.repo(f"alice/{name}")
    assert {"config.json", "model.safetensors", "tokenizer_config.json", *processor_files} <= set(model.files())
    card = _card(f"alice/{name}", hub_server, tmp_path)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "automatic-speech-recognition"
    results = {r.metric_type: r.metric_value for r in card.data.eval_results or []}
    assert results["wer"] == pytest.approx(wer, rel=1e-6), "the model-index carries the evaluated WER"
    assert "| word error rate |" in card.text
    # the asr Space, chosen by auto from the architecture, configured for the merged repo
    space = hub_server.state.repo(f"alice/{name}-demo", "space")
    assert {"app.py", "examples/en_hello.wav", "packages.txt"} <= set(space.files())
    variables = {k: v["value"] for k, v in space.variables.items()}
    assert variables["MODEL_REPO"] == f"alice/{name}" and "MODEL_FILE" not in variables
    # and the Space's app, as staged by the run, transcribes its example from the published repo
    folder = tmp_path / "runs" / name / "v1" / "publish" / "space" / f"alice__{name}-demo"
    template = SPACE_TEMPLATES["asr"]
    with launched(folder, variables, hub_server.url, tmp_path) as url:
        record = smoke_test(url, template, example_input(template, folder, []), timeout=120)
    assert record["ok"] and record["answer_chars"] > 0
