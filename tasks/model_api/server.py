"""The deployment's HTTP server: FastAPI + uvicorn, `/predict`, `/health`, `/info` and `/docs`.

`python -m tasks.model_api.server SPEC.json` (deploy.py writes the spec and starts it). The socket is
bound at once and the model loads in a background thread, so `/health` answers from the first second:
503 with the progress while loading, 200 when ready. Every route is async and does no model work on the
event loop: inputs that need tokenizing or decoding are checked in a worker thread, inference runs in the
batcher's thread (tasks/model_api/batching.py), so `/health` never queues behind the model. The `/predict`
body is the task's own pydantic model, so `/docs` shows that task's request and response schemas with
examples.

The event loop is the server's bottleneck under load (on CPU, with a small model, it parses every request
while the batcher runs), so `/predict` does as little there as it can: pydantic-core parses and validates
the body in one call from the raw bytes (`_RawBodyRoute`; FastAPI's own path decodes the JSON with the
standard library, then validates the objects), the default parameters and their batching key are computed
once, a text input's length check is a byte count (no tokenizer, no thread hop), the response is
serialised with orjson, there is no access log, and uvicorn runs on uvloop and httptools (dependencies;
uvicorn's "auto" picks them, over asyncio's loop and its pure-Python h11 parser).
"""

# No `from __future__ import annotations` here: FastAPI reads the /predict body type from the annotation,
# and that type is built at run time for the task (a local variable a string annotation could not name).

import argparse
import asyncio
import logging
import os
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError, create_model

from tasks.model_api.batching import Batcher, params_key
from tasks.model_api.chunking import forward_inputs, run_by_length
from tasks.model_api.inputs import FIELDS, Batch, InputError, InputKind, decode_audio, decode_image, raw_inputs
from tasks.model_api.inputs import request_model as build_request_model
from tasks.model_api.registry import DeploymentRegistry
from tasks.model_api.settings import ServerSpec
from tasks.model_api.tasks_table import ModelFacts, TaskSpec, task

log = logging.getLogger("loraship.model_api")
#: A text of B UTF-8 bytes is at most B + (special tokens) tokens for WordPiece, BPE, byte-level BPE and
#: SentencePiece with byte fallback alike (each token spends at least one byte), so one whose bytes plus this
#: bound fit max_input_tokens needs no tokenizing to pass the check.
_SPECIALS_BOUND = 16


def request_model(spec: TaskSpec) -> type:
    examples = [spec.example(ModelFacts())]
    if spec.batch_example:
        examples.append(spec.batch_example(ModelFacts()))
    return build_request_model(spec.title, spec.input, spec.params, examples)


def response_model(spec: TaskSpec) -> type:
    return create_model(
        f"{spec.title}Response",
        status=(Literal["ok"], "ok"),
        result=(spec.result | list[spec.result], ...),  # one input: its result; a batch: a list of them
        deployment_id=(str, ...),
        inference_time_ms=(float, ...),
    )


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))], 2)


def _rss() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover - psutil is a dependency; /info must still answer
        return 0


try:  # orjson is a dependency; the standard library's json still answers without it
    import orjson

    def _dumps(content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)

except ImportError:  # pragma: no cover
    import json

    def _dumps(content: Any) -> bytes:
        return json.dumps(_plain(content), separators=(",", ":")).encode()


def _json(content: Any, status_code: int = 200) -> Any:
    from starlette.responses import Response

    return Response(_dumps(content), status_code=status_code, media_type="application/json")


def validation_detail(exc: ValidationError) -> list[dict[str, Any]]:
    """A pydantic error as FastAPI's 422 `detail` (loc starts with "body"), so every bad body reads alike."""
    return [
        {"type": e["type"], "loc": ["body", *e["loc"]], "msg": e["msg"], "input": _plain_input(e.get("input"))}
        for e in exc.errors(include_url=False, include_context=False)
    ]


def _plain_input(x: Any) -> Any:
    return x if isinstance(x, (str, int, float, bool, type(None), list, dict)) else str(x)


def _raw_body_route(handler: Any) -> type:
    """An APIRoute documented from its endpoint's signature (the task's body model, so /docs shows it) but
    served by `handler(request)`, which validates the raw bytes itself. FastAPI's route class is its
    documented extension point for this."""
    from fastapi.routing import APIRoute

    class _RawBodyRoute(APIRoute):
        def get_route_handler(self) -> Any:
            return handler

    return _RawBodyRoute


class State:
    """What the routes read: the load progress, the loaded pipeline, the counters."""

    def __init__(self, spec: ServerSpec, registry: DeploymentRegistry | None):
        self.spec = spec
        self.task = task(spec.task)
        self.registry = registry
        self.started = time.time()
        self.status: Literal["loading", "ready", "failed"] = "loading"
        self.progress = 55.0
        self.step = "load"
        self.error: str | None = None
        self.loaded: Any = None
        self.batcher: Batcher | None = None
        self.requests = 0
        self.errors = 0
        self.latencies: deque[float] = deque(maxlen=4096)
        self.on_failure: Any = None

    def report(self, percent: float, step: str) -> None:
        self.progress, self.step = percent, step
        if self.registry:
            try:
                self.registry.progress(self.spec.deployment_id, percent, step)
            except Exception as exc:  # the registry is bookkeeping: never fail the load for it
                log.warning("could not record progress: %s", exc)

    def load(self) -> None:
        """Steps 3-5 in the background: weights, pipeline, batcher; then the routes serve."""
        from tasks.model_api.loading import load

        try:
            if self.spec.threads:
                import torch

                torch.set_num_threads(self.spec.threads)
            self.report(55.0, "load")
            loaded = load(
                self.task,
                self.spec.model_path,
                self.spec.device,
                self.spec.dtype,
                self.report,
                self.spec.max_input_tokens,
            )
            self.report(75.0, "server")
            spec = self.task
            per_pass = forward_inputs(loaded.device, self.spec.max_batch_size)
            self.batcher = Batcher(
                lambda items, params: run_by_length(lambda xs: spec.run(loaded.pipe, xs, params), items, per_pass),
                self.spec.max_batch_size,
                self.spec.max_wait_ms,
            )
            self.loaded = loaded
            self.status = "ready"
            self.report(85.0, "ready")
            log.info("%s: %s ready on %s (%s)", self.spec.name, self.spec.task, loaded.device, loaded.dtype)
        except BaseException as exc:
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("loading %s failed: %s", self.spec.model_path, self.error)
            if self.registry:
                try:
                    self.registry.update(self.spec.deployment_id, status="failed", last_error=self.error)
                except Exception:
                    pass
            if self.on_failure:
                self.on_failure()

    # --- input checks (in a worker thread: tokenizing and decoding stay off the event loop) ----------
    def needs_worker(self, batch: Batch) -> bool:
        """Whether checking `batch` means decoding or tokenizing (then `prepare` runs in a thread).

        A text whose UTF-8 bytes plus `_SPECIALS_BOUND` fit `max_input_tokens` cannot be too long (a
        token spends at least a byte), so most texts pass with a byte count on the event loop."""
        if self.task.input is InputKind.IMAGE or self.task.input is InputKind.AUDIO:
            return True
        limit = self.spec.max_input_tokens - _SPECIALS_BOUND
        for item in batch.items:
            text = item if isinstance(item, str) else f"{item['question']} {item['context']}"
            if len(text) > limit or (not text.isascii() and len(text.encode()) > limit):
                return True
        return False

    def prepare(self, batch: Batch) -> list[Any]:
        spec, facts, loaded = self.task, self.loaded.facts, self.loaded
        batch_field = FIELDS[spec.input][1]
        if len(batch.items) > self.spec.max_batch_size:
            raise InputError(
                (batch_field,), f"{len(batch.items)} inputs, over max_batch_size {self.spec.max_batch_size}"
            )
        tok = getattr(loaded.pipe, "tokenizer", None)
        out = []
        for item, loc in zip(batch.items, batch.locs):
            if spec.input is InputKind.IMAGE:
                out.append(decode_image(item, loc))
                continue
            if spec.input is InputKind.AUDIO:
                out.append(decode_audio(item, loc, facts.sampling_rate))
                continue
            text = item if isinstance(item, str) else f"{item['question']} {item['context']}"
            if spec.needs_mask and facts.mask_token and facts.mask_token not in text:
                raise InputError(loc, f"must contain the mask token {facts.mask_token}")
            if tok is not None and len(text.encode()) + _SPECIALS_BOUND > self.spec.max_input_tokens:
                n = len(tok(text)["input_ids"])
                if n > self.spec.max_input_tokens:
                    raise InputError(loc, f"{n} tokens, over max_input_tokens {self.spec.max_input_tokens}")
            out.append(item)
        return out

    def info(self) -> dict[str, Any]:
        lat = list(self.latencies)
        loaded = self.loaded
        cuda = None
        if loaded is not None and loaded.device == "cuda":
            import torch

            cuda = int(torch.cuda.memory_allocated())
        b = self.batcher
        return {
            "deployment_id": self.spec.deployment_id,
            "name": self.spec.name,
            "status": self.status,
            "model_id": self.spec.model_id,
            "model_path": self.spec.model_path,
            "revision": self.spec.revision,
            "sha": self.spec.sha,
            "task": self.spec.task,
            "device": loaded.device if loaded else None,
            "dtype": loaded.dtype if loaded else None,
            "parameters": loaded.parameters if loaded else None,
            "memory": {"model_bytes": loaded.memory_bytes if loaded else None, "rss_bytes": _rss(), "cuda_bytes": cuda},
            "uptime_s": round(time.time() - self.started, 1),
            "requests": self.requests,
            "errors": self.errors,
            "latency_ms": {"p50": _percentile(lat, 0.5), "p95": _percentile(lat, 0.95), "window": len(lat)},
            "batching": {
                "max_batch_size": self.spec.max_batch_size,
                "max_wait_ms": self.spec.max_wait_ms,
                "batches": b.batches if b else 0,
                "inputs": b.inputs if b else 0,
                "mean_batch": round(b.inputs / b.batches, 2) if b and b.batches else None,
            },
            "max_input_tokens": self.spec.max_input_tokens,
            # a request this model answers (the mask token is the tokenizer's): deploy's ready check sends it
            "example": self.task.example(loaded.facts) if loaded else None,
        }


def create_app(spec: ServerSpec, registry: DeploymentRegistry | None = None, load: bool = True) -> Any:
    """The FastAPI app for one deployment; `load` starts loading the model in a background thread."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    state = State(spec, registry)
    row = state.task
    Body = request_model(row)
    Response = response_model(row)
    app = FastAPI(
        title=f"{spec.name}: {row.name}",
        description=(
            f"`{spec.model_id}` served as **{row.name}** ({row.summary}). POST /predict with one input or a batch; "
            "GET /health (503 with progress while loading) and GET /info."
        ),
        version="1",
    )
    app.state.model_api = state

    @app.exception_handler(InputError)
    async def _bad_input(request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": exc.detail()})

    @app.get("/health", tags=["model API"])
    async def health() -> JSONResponse:
        """Answered on the event loop from memory: never behind the model."""
        if state.status == "ready":
            body = {
                "status": "ok",
                "deployment_id": spec.deployment_id,
                "uptime_s": round(time.time() - state.started, 1),
            }
            if state.batcher is not None:
                body["queued"] = state.batcher.pending
            return JSONResponse(body)
        body = {
            "status": state.status,
            "deployment_id": spec.deployment_id,
            "progress": state.progress,
            "step": state.step,
        }
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=503)

    @app.get("/info", tags=["model API"])
    async def info() -> dict[str, Any]:
        return state.info()

    default_params = row.params().model_dump() if not _required(row.params) else None
    default_key = params_key(default_params) if default_params is not None else None

    async def predict(request: Request) -> Any:
        """POST /predict: the body is validated from its bytes (pydantic-core), then batched."""
        try:
            body = Body.model_validate_json(await request.body())
        except ValidationError as exc:
            return _json({"detail": validation_detail(exc)}, 422)
        if state.status != "ready" or state.batcher is None:
            return _json(
                {"detail": f"the model is {state.status} ({state.progress:.0f}%, {state.step})", "error": state.error},
                503,
            )
        t0 = time.perf_counter()
        state.requests += 1
        try:
            batch = raw_inputs(body, row.input)
            if state.needs_worker(batch):
                items = await asyncio.to_thread(state.prepare, batch)
            else:
                items = state.prepare(batch)  # nothing to tokenize or decode: no thread hop
        except InputError as exc:
            return _json({"detail": exc.detail()}, 422)
        if body.parameters is None:
            params, key = default_params, default_key
        else:
            params = body.parameters.model_dump()
            key = params_key(params)
        try:
            outcome = await state.batcher.submit_async(items, params, key)
        except Exception as exc:
            state.errors += 1
            return _json(
                {"status": "error", "detail": f"{type(exc).__name__}: {exc}", "deployment_id": spec.deployment_id}, 500
            )
        state.latencies.append((time.perf_counter() - t0) * 1000.0)
        result = outcome.results if batch.batched else outcome.results[0]
        # sent as is: the response model documents the shape (/docs) without a second validation of every
        # result on the event loop, where it would delay /health and other requests
        return _json(
            {
                "status": "ok",
                "result": _plain(result),
                "deployment_id": spec.deployment_id,
                "inference_time_ms": round(outcome.inference_ms, 2),
            }
        )

    async def predict_doc(body: Body) -> Any:  # type: ignore[valid-type]  # pragma: no cover - /docs only
        """Run the task's pipeline on one input or a batch (dynamic batching with concurrent requests)."""

    app.router.add_api_route(
        "/predict",
        predict_doc,
        methods=["POST"],
        tags=["model API"],
        response_model=Response,
        responses={422: {}, 500: {}, 503: {}},
        route_class_override=_raw_body_route(predict),
    )

    if load:
        threading.Thread(target=state.load, name="model-api-loader", daemon=True).start()
    return app


def _required(params: type[BaseModel]) -> bool:
    return any(f.is_required() for f in params.model_fields.values())


def _plain(x: Any) -> Any:
    """numpy scalars and arrays (pipelines return them) as plain JSON values."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    return x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.model_api.server", description="Serve one model API deployment.")
    p.add_argument("spec", help="the ServerSpec JSON that deploy wrote")
    args = p.parse_args(argv)
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The event loop shares the GIL with the batcher's Python code (tokenizing, post-processing): hand it
    # over every 1 ms instead of 5, so /health and request parsing wait less behind a running batch.
    sys.setswitchinterval(0.001)
    spec = ServerSpec.model_validate_json(Path(args.spec).read_text())
    registry = DeploymentRegistry(spec.registry_path)
    app = create_app(spec, registry, load=False)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=spec.host,
            port=spec.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=10,
        )
    )
    state: State = app.state.model_api

    def _exit_soon() -> None:
        time.sleep(1.0)  # let a polling deploy read the 503 with the error once
        server.should_exit = True

    state.on_failure = _exit_soon
    threading.Thread(target=state.load, name="model-api-loader", daemon=True).start()
    log.info("pid %d serving %s on %s:%d", os.getpid(), spec.name, spec.host, spec.port)
    server.run()
    return 1 if state.status == "failed" else 0


if __name__ == "__main__":
    raise SystemExit(main())
