"""The serving process: llama-cpp-python's OpenAI-compatible app plus /health, /info and /predict.

`python -m tasks.serve.app --model F.gguf --port 8100 ...` builds llama-cpp-python's FastAPI app
(`llama_cpp.server.app.create_app`: /v1/models, /v1/chat/completions, /v1/completions, ...) and adds the
routes of seed 001: `GET /health` (ready, uptime), `GET /info` (model id, file, quant, size, sha256,
context) and `POST /predict` (`{"text": ...}` or `{"texts": [...]}` -> generations with
inference_time_ms). uvicorn runs it; SIGTERM/SIGINT make uvicorn finish open requests and exit.
tasks/serve/stage.py starts and stops these processes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any


def build_app(
    model_path: str,
    alias: str,
    info: dict[str, Any],
    n_ctx: int = 2048,
    n_threads: int | None = None,
    chat_format: str | None = None,
) -> Any:
    from fastapi import Body, Depends, HTTPException
    from llama_cpp.server.app import create_app, get_llama_proxy
    from llama_cpp.server.settings import ModelSettings, ServerSettings
    from starlette.concurrency import run_in_threadpool

    from tasks.gguf.toolchain import gpu_layers

    layers = gpu_layers()  # all on the GPU with a CUDA build of llama-cpp-python
    kwargs: dict[str, Any] = {
        "model": model_path,
        "model_alias": alias,
        "n_ctx": n_ctx,
        "n_gpu_layers": layers,
        "verbose": False,
    }
    if n_threads:
        kwargs.update(n_threads=n_threads, n_threads_batch=n_threads)
    if chat_format:
        kwargs["chat_format"] = chat_format
    app = create_app(server_settings=ServerSettings(), model_settings=[ModelSettings(**kwargs)])
    started = time.time()
    info = {**info, "id": alias, "file": model_path, "context": n_ctx, "gpu_layers": layers}

    @app.get("/health", tags=["loraship"])
    def health() -> dict[str, Any]:
        # the pid lets the serve stage tell its own server from another process that holds the port
        return {"status": "ok", "model": alias, "pid": os.getpid(), "uptime_s": round(time.time() - started, 1)}

    @app.get("/info", tags=["loraship"])
    def get_info() -> dict[str, Any]:
        return info

    @app.post("/predict", tags=["loraship"])
    async def predict(body: dict[str, Any] = Body(...), proxy: Any = Depends(get_llama_proxy)) -> dict[str, Any]:
        texts = body.get("texts")
        if texts is None and "text" in body:
            texts = [body["text"]]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise HTTPException(status_code=422, detail='send {"text": "..."} or {"texts": ["...", ...]}')
        max_tokens = int(body.get("max_tokens", 64))
        temperature = float(body.get("temperature", 0.0))
        chat = bool(body.get("chat", True))
        llama = proxy(alias)

        def run() -> list[dict[str, Any]]:
            out = []
            for text in texts:
                t0 = time.perf_counter()
                if chat:
                    r = llama.create_chat_completion(
                        messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=temperature
                    )
                    generated = r["choices"][0]["message"]["content"] or ""
                else:
                    r = llama.create_completion(text, max_tokens=max_tokens, temperature=temperature)
                    generated = r["choices"][0]["text"]
                ms = (time.perf_counter() - t0) * 1000
                out.append(
                    {
                        "input": text,
                        "generated_text": generated,
                        "tokens": r["usage"]["completion_tokens"],
                        "inference_time_ms": round(ms, 2),
                    }
                )
            return out

        t0 = time.perf_counter()
        predictions = await run_in_threadpool(run)
        return {
            "model": alias,
            "predictions": predictions,
            "total_time_ms": round((time.perf_counter() - t0) * 1000, 2),
        }

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tasks.serve.app",
        description="Serve a GGUF: OpenAI-compatible API plus /health, /info, /predict.",
    )
    p.add_argument("--model", required=True, help="the .gguf file")
    p.add_argument("--alias", help="model id in /v1/models (default: the file name without .gguf)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--chat-format", default=None)
    p.add_argument("--info-json", help="a JSON file with extra /info fields (quant, sha256, size)")
    args = p.parse_args(argv)
    import uvicorn

    info = json.loads(Path(args.info_json).read_text()) if args.info_json else {}
    alias = args.alias or Path(args.model).name.removesuffix(".gguf")
    app = build_app(
        str(Path(args.model).resolve()),
        alias,
        info,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        chat_format=args.chat_format,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
