"""A Gradio chat demo of a merged (transformers) model repo, the answer streamed token by token.

Configured by Space variables (environment): MODEL_REPO (the merged repo), TITLE, DESCRIPTION, EXAMPLES
(a JSON list of prompts), MAX_TOKENS, RATE_LIMIT_PER_MINUTE (per browser session), ZERO_GPU ("1" on
ZeroGPU hardware: each answer runs inside spaces.GPU, for GPU_DURATION seconds at most), HF_HOME (the model
cache, on persistent storage when the Space has it), and the HF_TOKEN secret (a read-only token, for a
private model repo). Off ZeroGPU the model runs on the GPU when there is one, else on the CPU. The model is
loaded on the first message (at start on ZeroGPU, as ZeroGPU wants), so the page comes up at once and a
download error is shown in the chat instead of crashing the Space.
"""

from __future__ import annotations

import os
import threading
import time

import gradio as gr
from loraship_space import RateLimiter, activity, env_examples, env_int, error_text, message_text

MODEL_REPO = os.environ.get("MODEL_REPO", "")
TITLE = os.environ.get("TITLE") or (MODEL_REPO.split("/")[-1] if MODEL_REPO else "transformers chat")
DESCRIPTION = os.environ.get("DESCRIPTION", "")
MAX_TOKENS = env_int("MAX_TOKENS", 256)
RATE_LIMIT = env_int("RATE_LIMIT_PER_MINUTE", 10)
ZERO_GPU = os.environ.get("ZERO_GPU", "") == "1"
GPU_DURATION = env_int("GPU_DURATION", 60)
EXAMPLES = env_examples(["Hello! Who are you?", "Write a haiku about the sea.", "Explain LoRA in one sentence."])

_model = None
_tokenizer = None
_load_lock = threading.Lock()
_limiter = RateLimiter(RATE_LIMIT)


def load_model():
    """Download the merged repo (cached in HF_HOME) and load it once, on the GPU when there is one."""
    global _model, _tokenizer
    with _load_lock:
        if _model is None:
            if not MODEL_REPO:
                raise RuntimeError("MODEL_REPO is not set: add it as a Space variable")
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            token = os.environ.get("HF_TOKEN") or None
            cuda = torch.cuda.is_available()  # on ZeroGPU, spaces makes this True outside spaces.GPU too
            _tokenizer = AutoTokenizer.from_pretrained(MODEL_REPO, token=token)
            model = AutoModelForCausalLM.from_pretrained(
                MODEL_REPO, token=token, dtype=torch.bfloat16 if cuda else torch.float32
            )
            _model = model.to("cuda" if cuda else "cpu").eval()
        return _model, _tokenizer


class _CountingStreamer:
    """transformers' TextIteratorStreamer that also counts the generated tokens (for tokens/s)."""

    def __init__(self, tokenizer):
        from transformers import TextIteratorStreamer

        self.inner = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
        self.tokens = 0
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen:
            self.tokens += int(value.numel())
        self._prompt_seen = True
        self.inner.put(value)

    def end(self):
        self.inner.end()

    def __iter__(self):
        return iter(self.inner)


def generate(messages: list[dict]):
    """Yield (text so far, tokens so far) while the model generates in a thread."""
    model, tokenizer = load_model()
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    streamer = _CountingStreamer(tokenizer)
    errors: list[BaseException] = []

    def run():
        try:
            model.generate(**inputs, streamer=streamer, max_new_tokens=MAX_TOKENS, do_sample=False)
        except BaseException as exc:  # shown in the chat by the caller
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text, streamer.tokens
    thread.join()
    if errors:
        raise errors[0]
    yield text, streamer.tokens


if ZERO_GPU:
    import spaces  # preinstalled on ZeroGPU Spaces

    load_model()  # ZeroGPU: load at start (on the emulated device); the GPU is held only inside spaces.GPU
    generate = spaces.GPU(duration=GPU_DURATION)(generate)


def respond(message: str, history: list, request: gr.Request):
    history = list(history or [])
    message = (message or "").strip()
    if not message:
        yield history, "", gr.update()
        return
    history.append({"role": "user", "content": message})
    activity()
    wait = _limiter.wait(request)
    if wait:
        history.append(
            {
                "role": "assistant",
                "content": _limiter.message(wait, "messages"),
            }
        )
        yield history, "", "rate limited"
        return
    history.append({"role": "assistant", "content": ""})
    yield history, "", "loading the model…" if _model is None else "thinking…"
    try:
        messages = [
            {"role": m["role"], "content": message_text(m["content"])}
            for m in history[:-1]
            if m.get("role") in ("user", "assistant")
        ]
        started = time.perf_counter()
        first = None
        n = 0
        for text, n in generate(messages):
            if text and first is None:
                first = time.perf_counter()
            history[-1]["content"] = text
            elapsed = time.perf_counter() - started
            yield history, "", f"{n} tokens · {n / max(elapsed, 1e-6):.1f} tokens/s"
        elapsed = time.perf_counter() - started
        if not history[-1]["content"]:
            history[-1]["content"] = "(the model returned an empty answer)"
        stats = f"{n} tokens in {elapsed:.2f} s · {n / max(elapsed, 1e-6):.1f} tokens/s"
        if first is not None:
            stats += f" · first token after {first - started:.2f} s"
        yield history, "", stats
    except Exception as exc:  # show the problem, keep the app up
        history[-1]["content"] = error_text(exc)
        yield history, "", "error"


with gr.Blocks(title=TITLE) as demo:
    device = "ZeroGPU" if ZERO_GPU else "transformers"
    gr.Markdown(f"# {TITLE}\n{DESCRIPTION}\n\nModel: `{MODEL_REPO}` · {device}")
    chatbot = gr.Chatbot(label="chat", elem_id="chat", height=420)
    with gr.Row():
        box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, elem_id="prompt", scale=8)
        send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
    stats = gr.Markdown("", elem_id="stats")
    gr.Examples(EXAMPLES, inputs=box, label="Examples")
    clear = gr.Button("Clear", elem_id="clear")
    # /chat is the API the live smoke test calls (gradio_client: predict(message, [], api_name="/chat"))
    box.submit(respond, [box, chatbot], [chatbot, box, stats], api_name="chat")
    send.click(respond, [box, chatbot], [chatbot, box, stats], api_visibility="private")
    clear.click(lambda: ([], ""), None, [chatbot, stats], api_visibility="private")

demo.queue(default_concurrency_limit=2)

if __name__ == "__main__":
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
        server_port=env_int("GRADIO_SERVER_PORT", 7860),
    )
