"""The speech path through the pipeline: a tiny wav2vec2 CTC model fine-tuned with LoRA goes through
download, merge (architecture-independent), the merged repo on the test Hub, its card and the asr Space;
the GGUF stages skip with the reason (llama.cpp cannot convert the architecture)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.prefect]
TOKEN_ENV = "LORASHIP_TEST_SPEECH_TOKEN"


def test_speech_model_to_merged_repo_card_and_asr_space(tmp_path, hub_server, prefect_api, monkeypatch):
    from flows.full import full
    from tasks.publish.space_smoke import example_input, smoke_test
    from tasks.publish.space_templates import SPACE_TEMPLATES
    from tests.asr_models import tiny_wav2vec2, tiny_wav2vec2_lora
    from tests.space_apps import launched

    monkeypatch.setenv(TOKEN_ENV, "hf_write_alice")
    base, adapter = tiny_wav2vec2(), tiny_wav2vec2_lora()
    cfg = {
        "model": {"name": "tinyasr", "version": "v1", "base_model": str(base)},
        "source": {"kind": "local", "path": str(adapter)},
        "merge": {"base_model": str(base)},
        "hub": {"token": f"env:{TOKEN_ENV}", "endpoint": hub_server.url, "repos": ["merged"]},
        "space": {"poll_interval": 0.05, "smoke_test": False},
        "serving": {"engine": "transformers"},
        "pipeline": {"runs_dir": str(tmp_path / "runs")},
    }
    state = full(
        config=cfg,
        only=["download", "merge", "convert", "quantize", "serve", "health", "hub_push", "card", "space"],
        return_state=True,
    )
    assert state.is_completed(), state.message
    outcomes = {o.stage: (str(o.status), o.message) for o in state.result().stages}
    assert outcomes["merge"][0] == "done" and "Wav2Vec2ForCTC is checked per tensor only" in outcomes["merge"][1]
    assert outcomes["convert"] == ("skipped", outcomes["convert"][1])
    assert "cannot convert the architecture Wav2Vec2ForCTC" in outcomes["convert"][1]
    assert outcomes["quantize"][0] == "skipped" and "no GGUF to quantize" in outcomes["quantize"][1]
    # served by the transformers engine as a speech recognition model API; health speaks OpenAI's API: skipped
    assert outcomes["serve"][0] == "done" and outcomes["health"][0] == "skipped"
    assert {s: outcomes[s][0] for s in ("hub_push", "card", "space")} == dict.fromkeys(
        ("hub_push", "card", "space"), "done"
    )
    # the merged repo as transformers expects it, no GGUF repo
    assert sorted(hub_server.state.repos) == [("model", "alice/tinyasr"), ("space", "alice/tinyasr-demo")]
    model = hub_server.state.repo("alice/tinyasr")
    assert {"config.json", "model.safetensors", "vocab.json", "tokenizer_config.json"} <= set(model.files())
    card = hub_server.state.blob(model.files()["README.md"].sha256).decode()
    assert "library_name: transformers" in card
    # the asr Space, chosen by auto from the architecture, configured for the merged repo
    space = hub_server.state.repo("alice/tinyasr-demo", "space")
    assert {"app.py", "examples/en_hello.wav", "packages.txt"} <= set(space.files())
    variables = {k: v["value"] for k, v in space.variables.items()}
    assert variables["MODEL_REPO"] == "alice/tinyasr" and "MODEL_FILE" not in variables
    # and the Space's app, as staged by the run, transcribes its example from the published repo
    folder = tmp_path / "runs" / "tinyasr" / "v1" / "publish" / "space" / "alice__tinyasr-demo"
    template = SPACE_TEMPLATES["asr"]
    with launched(folder, variables, hub_server.url, tmp_path) as url:
        record = smoke_test(url, template, example_input(template, folder, []), timeout=120)
    assert record["ok"] and record["answer_chars"] > 0
