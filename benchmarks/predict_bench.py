"""The model API against the server a user writes by hand: text-classification on CPU, 1/8/32 clients.

    flock /work/bench.lock python -m benchmarks.predict_bench [--shape distilbert|tiny] [--seconds 8]

Contenders, both real HTTP servers on loopback, same model, same machine:
- ours: `tasks/model_api` through `deploy()` (a server subprocess with dynamic batching),
- hand-written: FastAPI + uvicorn calling the transformers pipeline once per request in a plain `def`
  route (what the FastAPI docs and most tutorials show; FastAPI runs it in its thread pool). This script
  is that server too: `python -m benchmarks.predict_bench --serve-naive MODEL --port N`.
Measured per concurrency: requests/s, latency p50/p95 (client side), and, while 32 clients are busy,
the p99 of `GET /health` polled every 20 ms. Goals (issue 17): >= 3x the hand-written throughput at 32
clients, /health p99 <= 50 ms. The model is a BERT-style classifier built here with random weights
(tasks/support/tiny_task_models.py; no downloads), the texts are sentences of 8-40 words.
After the servers stop, the pipeline alone is timed in this process (one text per call and
max_batch_size per call, no HTTP): the ceiling any server has on this machine (`--no-ceiling` skips it).
Results: benchmarks/results/predict_bench-<shape>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests
from pydantic import BaseModel

from benchmarks.harness import ROOT, machine, save, table

WORDS = (
    "the service was quick and friendly but the food arrived cold and the bill was wrong twice so we left "
    "early although the view of the harbour at sunset made up for most of it and we might come back"
).split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(8, 40))) for _ in range(n)]


def ceiling(model: Path, threads: int, batch: int, seconds: float) -> list[dict[str, Any]]:
    """What the model itself can do on this machine, with no HTTP: the pipeline called in this process on the
    benchmark's texts, one per call and `batch` per call. Where the one-per-call and batched rows differ little,
    the model, not the server, is the cost, and no server can be 3x faster than the hand-written one."""
    import torch
    from transformers import pipeline

    if threads:
        torch.set_num_threads(threads)
    pipe = pipeline("text-classification", model=str(model), device="cpu")
    items = texts(512)
    out = []
    for per_call in (1, batch):
        pipe(items[:per_call], batch_size=per_call)  # warm-up
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            chunk = [items[(done + i) % len(items)] for i in range(per_call)]
            pipe(chunk, batch_size=per_call)
            done += per_call
        rps = done / (time.perf_counter() - t0)
        out.append(
            {"contender": f"pipeline in-process, {per_call} per call (no HTTP)", "throughput_rps": round(rps, 1)}
        )
    return out


class Req(BaseModel):
    text: str


def serve_naive(model: str, port: int, threads: int | None) -> None:
    """The hand-written server: one pipeline call per request."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import pipeline

    if threads:
        torch.set_num_threads(threads)
    pipe = pipeline("text-classification", model=model, device="cpu")
    app = FastAPI()

    @app.post("/predict")
    def predict(req: Req) -> dict[str, Any]:
        t0 = time.perf_counter()
        result = pipe(req.text)
        return {"status": "ok", "result": result, "inference_time_ms": (time.perf_counter() - t0) * 1000}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))], 1) if s else float("nan")


async def _post_loop(
    host: str, port: int, bodies: list[bytes], offset: int, step: int, start_at: float, stop_at: float, out: dict
) -> None:
    """One keep-alive client: POST /predict back to back until `stop_at`; latencies after `start_at` count.

    Raw HTTP/1.1 over asyncio streams: a request is one write of prepared bytes and a response is read by its
    Content-Length, so a request costs the load generator tens of microseconds, not the milliseconds of
    requests/httpx in threads (on two shared cores the client's CPU is taken from the servers it measures)."""
    reader, writer = await asyncio.open_connection(host, port)
    k = offset
    try:
        while (t0 := time.perf_counter()) < stop_at:
            writer.write(bodies[k % len(bodies)])
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            dt = (time.perf_counter() - t0) * 1000
            k += step
            if t0 >= start_at:
                (out["lat"] if status == 200 else out["errors"]).append(dt)
    finally:
        writer.close()


def _requests(host: str, port: int, n: int = 512) -> list[bytes]:
    """Prepared `POST /predict {"text": ...}` requests (the same texts, in the same order, for every contender)."""
    out = []
    for t in texts(n):
        body = json.dumps({"text": t}).encode()
        out.append(
            b"POST /predict HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (host.encode(), port, len(body), body)
        )
    return out


def poll_health(url: str, start_at: float, stop_at: float, every_s: float = 0.02) -> list[float]:
    """GET /health every 20 ms on one keep-alive connection; the latencies (ms) of those sent after `start_at`.

    Run in a process of its own (see `load`): in the load generator's process it would wait for the GIL and
    the event loop, and charge that wait to the server."""
    import http.client

    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    out: list[float] = []
    while (t0 := time.perf_counter()) < stop_at:
        conn.request("GET", "/health")
        r = conn.getresponse()
        r.read()
        if t0 >= start_at and r.status == 200:
            out.append((time.perf_counter() - t0) * 1000)
        time.sleep(every_s)
    conn.close()
    return out


def load(url: str, clients: int, seconds: float, poll_health_too: bool) -> dict[str, Any]:
    """`clients` keep-alive connections posting back to back for `seconds` after a 1 s warm-up, all in one
    asyncio loop in this process; with `poll_health_too`, /health is polled from a separate process."""
    import multiprocessing

    host, port_s = url.split("//")[1].split(":")
    port = int(port_s)
    bodies = _requests(host, port)
    start_at = time.perf_counter() + 1.0
    stop_at = start_at + seconds
    out: dict[str, list[float]] = {"lat": [], "errors": []}
    pool = multiprocessing.get_context("spawn").Pool(1) if poll_health_too else None
    try:
        # perf_counter is CLOCK_MONOTONIC on Linux: the same clock in the poller's process
        polled = pool.apply_async(poll_health, (url, start_at, stop_at)) if pool else None

        async def run() -> None:
            await asyncio.gather(
                *(_post_loop(host, port, bodies, i, clients, start_at, stop_at, out) for i in range(clients))
            )

        asyncio.run(run())
        health = polled.get(timeout=60) if polled else []
    finally:
        if pool:
            pool.close()
            pool.join()
    lat = out["lat"]
    row: dict[str, Any] = {
        "clients": clients,
        "requests": len(lat),
        "errors": len(out["errors"]),
        "throughput_rps": round(len(lat) / seconds, 1),
        "p50_ms": _pct(lat, 0.5),
        "p95_ms": _pct(lat, 0.95),
    }
    if poll_health_too:
        row |= {"health_p99_ms": _pct(health, 0.99), "health_p50_ms": _pct(health, 0.5), "health_polls": len(health)}
    return row


def _wait(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


OURS = "ours (dynamic batching)"
HAND = "hand-written FastAPI (per request)"


#: The model shapes: `distilbert` is the text-classification pipeline's default model's
#: (distilbert-base-uncased-finetuned-sst-2-english: dim 768, 6 layers, 67M parameters), the workload the
#: issue names; `tiny` is bert-tiny's (hidden 128, 2 layers), where HTTP, not the model, is the cost.
SHAPES = ("distilbert", "tiny")


def _build_distilbert(out: Path) -> None:
    """A DistilBERT SST-2-shaped classifier with random weights and a WordPiece tokenizer trained here.

    The vocabulary is trained on the project's corpus plus the benchmark's words (so a word is one token,
    as in the real uncased vocabulary) and the embedding matrix has the real model's 30522 rows."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast, DistilBertConfig, DistilBertForSequenceClassification

    from tasks.support.tiny_models import corpus_lines

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(corpus_lines() + texts(256, seed=1), vocab_size=30522, min_frequency=1, show_progress=False)
    out.mkdir(parents=True, exist_ok=True)
    wp.save_model(str(out))
    tok = BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True)
    cfg = DistilBertConfig(
        vocab_size=30522,
        dim=768,
        n_layers=6,
        n_heads=12,
        hidden_dim=3072,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    torch.manual_seed(0)
    DistilBertForSequenceClassification(cfg).eval().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def bench_model(shape: str) -> Path:
    """The benchmark's model folder, built once into the cache (nothing is downloaded)."""
    from tasks.core.constants import cache_root
    from tasks.support.tiny_models import build_once
    from tasks.support.tiny_task_models import tiny_bert

    if shape == "tiny":
        return tiny_bert("text-classification", hidden=128, layers=2)
    return build_once(cache_root() / "models" / "bench-distilbert-sst2-shape-v1", _build_distilbert)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.predict_bench")
    p.add_argument("--shape", choices=SHAPES, default="distilbert", help="the model's shape (see SHAPES)")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads, the same for both servers (0: torch's default)"
    )
    p.add_argument("--only", choices=("ours", "hand"), help="run one contender (profiling, tuning)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the in-process pipeline rows (no HTTP)")
    p.add_argument("--serve-naive", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_naive:
        serve_naive(args.serve_naive, args.port, args.threads or None)
        return 0

    from transformers import AutoConfig

    from tasks.model_api.deploy import deploy, stop
    from tasks.model_api.registry import DeploymentRegistry
    from tasks.model_api.settings import DeployRequest

    levels = [int(x) for x in args.levels.split(",")]
    model = bench_model(args.shape)
    # the same OpenMP setting for both servers: deploy gives ours PASSIVE (spinning workers on a shared
    # machine cost it 5x); the hand-written server gets the same, so the ratio measures the servers
    omp = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    urls: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        if args.only != "ours":  # the hand-written server first: it loads while ours deploys
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            naive = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.predict_bench", "--serve-naive", str(model), "--port", str(port)]
                + ["--threads", str(args.threads)],
                cwd=str(ROOT),
                env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": omp},
            )
            stack.callback(lambda: (naive.terminate(), naive.wait(30)))
            urls[HAND] = f"http://127.0.0.1:{port}"
        if args.only != "hand":
            home = stack.enter_context(tempfile.TemporaryDirectory())
            os.environ["LORASHIP_HOME"] = home
            os.environ["OMP_WAIT_POLICY"] = omp
            registry = DeploymentRegistry()
            dep = deploy(
                DeployRequest(
                    model=str(model),
                    name="bench",
                    task="text-classification",
                    device="cpu",
                    max_batch_size=args.max_batch_size,
                    max_wait_ms=args.max_wait_ms,
                    threads=args.threads or None,
                ),
                registry,
            )
            stack.callback(stop, "bench", registry)
            urls[OURS] = dep.url or ""
        for url in urls.values():
            _wait(url)
        # level by level, the contenders one after the other: both see the same machine (other sessions'
        # load drifts over minutes), and the idle one sleeps meanwhile (its OpenMP workers are passive)
        for c in levels:
            for name, url in urls.items():
                row = {"contender": name, **load(url, c, args.seconds, poll_health_too=c == max(levels))}
                print(row, flush=True)
                rows.append(row)
        if OURS in urls:
            info = requests.get(f"{urls[OURS]}/info", timeout=10).json()
    cols = ["contender", "clients", "throughput_rps", "p50_ms", "p95_ms", "health_p99_ms", "errors"]
    print(table(rows, cols))
    # after both servers have stopped, so the machine is the pipeline's alone
    limits = [] if args.no_ceiling else ceiling(model, args.threads, args.max_batch_size, args.seconds)
    if limits:
        print(table(limits, ["contender", "throughput_rps"]))
    if args.only:
        print(info.get("batching", ""))
        return 0
    top = max(levels)
    ours = next(r for r in rows if r["clients"] == top and r["contender"] == OURS)
    theirs = next(r for r in rows if r["clients"] == top and r["contender"] == HAND)
    speedup = round(ours["throughput_rps"] / max(theirs["throughput_rps"], 1e-9), 2)
    cfg = AutoConfig.from_pretrained(model)
    payload = {
        "command": "flock /work/bench.lock python -m benchmarks.predict_bench " + " ".join(argv or sys.argv[1:]),
        "machine": machine(),
        "model": {
            "shape": args.shape,
            "kind": f"{cfg.architectures[0]}, random weights",
            "hidden": getattr(cfg, "dim", None) or cfg.hidden_size,
            "layers": getattr(cfg, "n_layers", None) or cfg.num_hidden_layers,
        },
        "parameters": info["parameters"],
        "seconds_per_level": args.seconds,
        "torch_threads": args.threads or "default",
        "omp_wait_policy": omp,
        "client": "one asyncio process, raw HTTP/1.1 keep-alive; /health polled every 20 ms from another process",
        "batching": {"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms, **info["batching"]},
        "rows": rows,
        "ceiling": limits,
        f"speedup_at_{top}_clients": speedup,
        "ours_share_of_batched_ceiling": round(ours["throughput_rps"] / limits[-1]["throughput_rps"], 2)
        if limits
        else None,
        "goals": {
            "speedup_3x": speedup >= 3.0,
            "health_p99_50ms": (ours.get("health_p99_ms") or 1e9) <= 50.0,
            "hand_written_health_p99_ms": theirs.get("health_p99_ms"),
        },
    }
    out = save(f"predict_bench-{args.shape}", payload)
    print(f"speedup at {top} clients: {speedup}x; results: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
