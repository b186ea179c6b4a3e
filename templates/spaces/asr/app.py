"""A Gradio speech recognition demo of a merged model repo (Whisper-, Voxtral- or wav2vec2-style), run with
transformers.

Configured by Space variables (environment): MODEL_REPO (the merged repo), TITLE, DESCRIPTION, LANGUAGE
(the default language choice; `auto` lets the model detect it), MAX_TOKENS (the longest transcription),
RATE_LIMIT_PER_MINUTE (per browser session), ZERO_GPU ("1" on ZeroGPU hardware: each transcription runs
inside spaces.GPU, GPU_DURATION seconds at most), HF_HOME (the model cache, on persistent storage when the
Space has it) and the HF_TOKEN secret (a read-only token, for a private model repo).

Audio comes from an upload or the microphone. WAV is read without ffmpeg (packages.txt installs ffmpeg on
the Space for other formats), mixed to mono and resampled to the feature extractor's rate. The language menu
is shown when the model offers a choice: multilingual Whisper (its generation config's languages) and
Voxtral; a CTC model such as wav2vec2 has none. The model is loaded on the first request (at start on
ZeroGPU), so the page comes up at once and a download error is shown instead of crashing the Space.
"""

from __future__ import annotations

import json
import os
import threading
import time

import gradio as gr
import numpy as np
from loraship_space import RateLimiter, activity, env_int, error_text

MODEL_REPO = os.environ.get("MODEL_REPO", "")
TITLE = os.environ.get("TITLE") or (MODEL_REPO.split("/")[-1] if MODEL_REPO else "Speech recognition")
DESCRIPTION = os.environ.get("DESCRIPTION", "")
LANGUAGE = os.environ.get("LANGUAGE") or "auto"
MAX_TOKENS = env_int("MAX_TOKENS", 256)
RATE_LIMIT = env_int("RATE_LIMIT_PER_MINUTE", 10)
ZERO_GPU = os.environ.get("ZERO_GPU", "") == "1"
GPU_DURATION = env_int("GPU_DURATION", 60)
EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples")
# Voxtral's transcription languages (its model card); the processor does not list them
VOXTRAL_LANGUAGES = ["en", "es", "fr", "pt", "hi", "de", "nl", "it"]

_model = None
_load_lock = threading.Lock()
_limiter = RateLimiter(RATE_LIMIT)


def _token():
    return os.environ.get("HF_TOKEN") or None


def model_languages() -> list[str]:
    """The languages the model offers (empty: no choice), from its small config files only."""
    if not MODEL_REPO:
        return []
    try:
        from huggingface_hub import hf_hub_download

        config = json.load(open(hf_hub_download(MODEL_REPO, "config.json", token=_token())))
        if config.get("model_type") == "voxtral":
            return list(VOXTRAL_LANGUAGES)
        if config.get("model_type") != "whisper":
            return []
        gen = json.load(open(hf_hub_download(MODEL_REPO, "generation_config.json", token=_token())))
        return sorted(str(k).strip("<|>") for k in (gen.get("lang_to_id") or {}))
    except Exception as exc:  # no menu rather than no app
        print(f"language list unavailable: {type(exc).__name__}: {exc}", flush=True)
        return []


def load_model():
    """Download the merged repo (cached in HF_HOME) and load it once, on the GPU when there is one."""
    global _model
    with _load_lock:
        if _model is None:
            if not MODEL_REPO:
                raise RuntimeError("MODEL_REPO is not set: add it as a Space variable")
            import torch
            from transformers import AutoConfig, AutoProcessor, pipeline

            device = "cuda" if torch.cuda.is_available() else "cpu"
            config = AutoConfig.from_pretrained(MODEL_REPO, token=_token())
            if config.model_type == "voxtral":
                from transformers import VoxtralForConditionalGeneration

                processor = AutoProcessor.from_pretrained(MODEL_REPO, token=_token())
                model = VoxtralForConditionalGeneration.from_pretrained(MODEL_REPO, token=_token()).to(device)
                _model = ("voxtral", processor, model.eval())
            else:
                asr = pipeline("automatic-speech-recognition", model=MODEL_REPO, token=_token(), device=device)
                _model = ("pipeline", asr, None)
        return _model


def to_mono(audio, rate: int) -> np.ndarray:
    """Gradio's (sample rate, int16/float samples) as float32 mono at `rate` Hz."""
    sr, data = audio
    data = np.asarray(data)
    if data.dtype.kind == "i":
        data = data.astype(np.float32) / float(np.iinfo(data.dtype).max)
    data = data.astype(np.float32)
    if data.ndim == 2:
        data = data.mean(axis=1)
    if sr != rate and len(data):
        n = int(round(len(data) * rate / sr))
        data = np.interp(np.linspace(0, len(data) - 1, n), np.arange(len(data)), data).astype(np.float32)
    return data


def transcribe_samples(samples: np.ndarray, rate: int, language: str) -> str:
    kind, first, model = load_model()
    lang = None if language in ("", "auto") else language
    if kind == "voxtral":
        inputs = first.apply_transcription_request(
            audio=samples, sampling_rate=rate, language=lang, model_id=MODEL_REPO
        ).to(model.device)
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS)
        return first.batch_decode(out[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)[0]
    kwargs = {}
    if first.model.config.model_type == "whisper":
        kwargs["generate_kwargs"] = {"max_new_tokens": MAX_TOKENS, **({"language": lang} if lang else {})}
    return first({"raw": samples, "sampling_rate": rate}, **kwargs)["text"]


if ZERO_GPU:
    import spaces  # preinstalled on ZeroGPU Spaces

    load_model()  # ZeroGPU: load at start; the GPU is held only inside spaces.GPU
    transcribe_samples = spaces.GPU(duration=GPU_DURATION)(transcribe_samples)


def transcribe(audio, language: str, request: gr.Request):
    """(transcription, timing) for the uploaded or recorded audio; problems are shown, not raised."""
    if audio is None:
        return "", "upload a file or record with the microphone first"
    activity()
    wait = _limiter.wait(request)
    if wait:
        return "", _limiter.message(wait, "requests")
    try:
        kind, first, _ = load_model()
        rate = int(first.feature_extractor.sampling_rate)  # the pipeline's or the Voxtral processor's
        samples = to_mono(audio, rate)
        seconds = len(samples) / rate
        started = time.perf_counter()
        text = transcribe_samples(samples, rate, language or "auto").strip()
        took = time.perf_counter() - started
        timing = f"{seconds:.1f} s of audio transcribed in {took:.2f} s ({seconds / max(took, 1e-6):.1f}x real time)"
        return text or "(no speech recognised)", timing
    except Exception as exc:  # show the problem, keep the app up
        return error_text(exc), "error"


LANGUAGES = model_languages()
examples = (
    sorted(os.path.join(EXAMPLES_DIR, f) for f in os.listdir(EXAMPLES_DIR)) if os.path.isdir(EXAMPLES_DIR) else []
)

with gr.Blocks(title=TITLE) as demo:
    device = "ZeroGPU" if ZERO_GPU else "transformers"
    gr.Markdown(f"# {TITLE}\n{DESCRIPTION}\n\nModel: `{MODEL_REPO}` · {device}")
    with gr.Row():
        with gr.Column():
            audio = gr.Audio(sources=["upload", "microphone"], type="numpy", label="audio", elem_id="audio")
            language = gr.Dropdown(
                ["auto", *LANGUAGES],
                value=LANGUAGE if LANGUAGE in LANGUAGES else "auto",
                label="language",
                elem_id="language",
                visible=bool(LANGUAGES),
            )
            go = gr.Button("Transcribe", variant="primary", elem_id="transcribe")
        with gr.Column():
            text = gr.Textbox(label="transcription", elem_id="text", lines=6)
            timing = gr.Markdown("", elem_id="timing")
    if examples:
        gr.Examples(examples, inputs=audio, label="Examples")
    # /transcribe is the API the live smoke test calls (gradio_client: predict(handle_file(wav), "auto"))
    go.click(transcribe, [audio, language], [text, timing], api_name="transcribe")

demo.queue(default_concurrency_limit=2)

if __name__ == "__main__":
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
        server_port=env_int("GRADIO_SERVER_PORT", 7860),
    )
