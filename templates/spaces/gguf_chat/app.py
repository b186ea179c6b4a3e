"""A Gradio chat demo for one GGUF file of a model repo, run with llama-cpp-python.

Configured by Space variables (environment): MODEL_REPO and MODEL_FILE (which GGUF to download),
TITLE, DESCRIPTION, EXAMPLES (a JSON list of prompts), MAX_TOKENS, N_CTX, RATE_LIMIT_PER_MINUTE (per
browser session), and the HF_TOKEN secret (a read-only token, for a private model repo). The model is
loaded on the first message, so the page comes up at once and a download error is shown in the chat
instead of crashing the Space.
"""

from __future__ import annotations

import os
import threading
import time

import gradio as gr
from loraship_space import RateLimiter, activity, env_examples, env_int, error_text, message_text

MODEL_REPO = os.environ.get("MODEL_REPO", "")
MODEL_FILE = os.environ.get("MODEL_FILE", "")
TITLE = os.environ.get("TITLE") or (MODEL_REPO.split("/")[-1] if MODEL_REPO else "GGUF chat")
DESCRIPTION = os.environ.get("DESCRIPTION", "")
MAX_TOKENS = env_int("MAX_TOKENS", 256)
N_CTX = env_int("N_CTX", 2048)
RATE_LIMIT = env_int("RATE_LIMIT_PER_MINUTE", 10)
EXAMPLES = env_examples(["Hello! Who are you?", "Write a haiku about the sea.", "Explain LoRA in one sentence."])

_llm = None
_llm_lock = threading.Lock()
_gen_lock = threading.Lock()  # one generation at a time: llama.cpp contexts are not thread-safe
_limiter = RateLimiter(RATE_LIMIT)


def load_model():
    """Download the GGUF (cached) and load it once."""
    global _llm
    with _llm_lock:
        if _llm is None:
            if not MODEL_REPO or not MODEL_FILE:
                raise RuntimeError("MODEL_REPO and MODEL_FILE are not set: add them as Space variables")
            from huggingface_hub import hf_hub_download
            from llama_cpp import Llama

            path = hf_hub_download(MODEL_REPO, MODEL_FILE, token=os.environ.get("HF_TOKEN") or None)
            _llm = Llama(model_path=path, n_ctx=N_CTX, n_threads=max(1, (os.cpu_count() or 2)), verbose=False)
        return _llm


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
    yield history, "", "loading the model…" if _llm is None else "thinking…"
    try:
        llm = load_model()
        messages = [
            {"role": m["role"], "content": message_text(m["content"])}
            for m in history[:-1]
            if m.get("role") in ("user", "assistant")
        ]
        with _gen_lock:
            started = time.perf_counter()
            first = None
            n = 0
            for chunk in llm.create_chat_completion(messages=messages, max_tokens=MAX_TOKENS, stream=True):
                delta = chunk["choices"][0].get("delta", {}).get("content") or ""
                if not delta:
                    continue
                if first is None:
                    first = time.perf_counter()
                n += 1
                history[-1]["content"] += delta
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
    gr.Markdown(f"# {TITLE}\n{DESCRIPTION}\n\nModel: `{MODEL_REPO}` · file `{MODEL_FILE}`")
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
