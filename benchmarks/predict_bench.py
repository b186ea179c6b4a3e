"""The model API against the server a user writes by hand: text-classification on CPU, 1/8/32 clients.

    flock /work/bench.lock python -m benchmarks.predict_bench [--seconds 8] [--hidden 256 --layers 4]

Contenders, both real HTTP servers on loopback, same model, same machine:
- ours: `tasks/model_api` through `deploy()` (a server subprocess with dynamic batching),
- hand-written: FastAPI + uvicorn calling the transformers pipeline once per request in a plain `def`
  route (what the FastAPI docs and most tutorials show; FastAPI runs it in its thread pool). This script
  is that server too: `python -m benchmarks.predict_bench --serve-naive MODEL --port N`.
Measured per concurrency: requests/s, latency p50/p95 (client side), and, while 32 clients are busy,
the p99 of `GET /health` polled every 20 ms. Goals (issue 17): >= 3x the hand-written throughput at 32
clients, /health p99 <= 50 ms. The model is a BERT-style classifier built here with random weights
(tasks/support/tiny_task_models.py; no downloads), the texts are sentences of 8-40 words.
Results: benchmarks/results/predict_bench-threads<N|default>.json.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
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


def load(url: str, clients: int, seconds: float, poll_health: bool) -> dict[str, Any]:
    """`clients` threads posting back to back for `seconds` (after a 1 s warm-up); optionally /health polls."""
    pool = texts(512)
    lat: list[float] = []
    health: list[float] = []
    errors = [0]
    stop_at = [0.0]
    start_at = time.perf_counter() + 1.0
    lock = threading.Lock()

    def client(i: int) -> None:
        s = requests.Session()
        k = i
        while True:
            now = time.perf_counter()
            if stop_at[0] and now >= stop_at[0]:
                return
            t0 = time.perf_counter()
            r = s.post(f"{url}/predict", json={"text": pool[k % len(pool)]}, timeout=120)
            dt = (time.perf_counter() - t0) * 1000
            k += clients
            if t0 >= start_at:
                with lock:
                    if r.status_code == 200:
                        lat.append(dt)
                    else:
                        errors[0] += 1

    def poller() -> None:
        s = requests.Session()
        while not stop_at[0] or time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            r = s.get(f"{url}/health", timeout=30)
            if t0 >= start_at and r.status_code == 200:
                health.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.02)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    if poll_health:
        threads.append(threading.Thread(target=poller))
    stop_at[0] = start_at + seconds
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out: dict[str, Any] = {
        "clients": clients,
        "requests": len(lat),
        "errors": errors[0],
        "throughput_rps": round(len(lat) / seconds, 1),
        "p50_ms": _pct(lat, 0.5),
        "p95_ms": _pct(lat, 0.95),
    }
    if poll_health:
        out |= {"health_p99_ms": _pct(health, 0.99), "health_p50_ms": _pct(health, 0.5), "health_polls": len(health)}
    return out


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


def run_levels(name: str, url: str, levels: list[int], seconds: float) -> list[dict[str, Any]]:
    rows = []
    for c in levels:
        row = {"contender": name, **load(url, c, seconds, poll_health=c == max(levels))}
        print(row, flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.predict_bench")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads, the same for both servers (0: torch's default)"
    )
    p.add_argument(
        "--naive-passive",
        action="store_true",
        help="give the hand-written server OMP_WAIT_POLICY=PASSIVE too (ours sets it; torch's default spins)",
    )
    p.add_argument("--serve-naive", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_naive:
        serve_naive(args.serve_naive, args.port, args.threads or None)
        return 0

    from tasks.model_api.deploy import deploy, stop
    from tasks.model_api.registry import DeploymentRegistry
    from tasks.model_api.settings import DeployRequest
    from tasks.support.tiny_task_models import tiny_bert

    levels = [int(x) for x in args.levels.split(",")]
    model = tiny_bert("text-classification", hidden=args.hidden, layers=args.layers)
    from transformers import AutoConfig

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as home:
        os.environ["LORASHIP_HOME"] = home
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
        try:
            rows += run_levels("ours (dynamic batching)", dep.url or "", levels, args.seconds)
            info = requests.get(f"{dep.url}/info", timeout=10).json()
        finally:
            stop("bench", registry)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    naive = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.predict_bench", "--serve-naive", str(model), "--port", str(port)]
        + ["--threads", str(args.threads)],
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT), **({"OMP_WAIT_POLICY": "PASSIVE"} if args.naive_passive else {})},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(url)
        rows += run_levels("hand-written FastAPI (per request)", url, levels, args.seconds)
    finally:
        naive.terminate()
        naive.wait(30)
    top = max(levels)
    ours = next(r for r in rows if r["clients"] == top and r["contender"].startswith("ours"))
    theirs = next(r for r in rows if r["clients"] == top and r["contender"].startswith("hand"))
    speedup = round(ours["throughput_rps"] / max(theirs["throughput_rps"], 1e-9), 2)
    cfg = AutoConfig.from_pretrained(model)
    payload = {
        "command": "flock /work/bench.lock python -m benchmarks.predict_bench " + " ".join(argv or sys.argv[1:]),
        "machine": machine(),
        "model": {"kind": "BERT-style classifier, random weights", "hidden": cfg.hidden_size, "layers": args.layers},
        "parameters": info["parameters"],
        "seconds_per_level": args.seconds,
        "torch_threads": args.threads or "default",
        "batching": {"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms, **info["batching"]},
        "rows": rows,
        f"speedup_at_{top}_clients": speedup,
        "goals": {
            "speedup_3x": speedup >= 3.0,
            "health_p99_50ms": (ours.get("health_p99_ms") or 1e9) <= 50.0,
            "hand_written_health_p99_ms": theirs.get("health_p99_ms"),
        },
    }
    payload["hand_written_omp_wait_policy"] = "PASSIVE" if args.naive_passive else os.environ.get("OMP_WAIT_POLICY")
    tag = f"-threads{args.threads or 'default'}" + ("-both-passive" if args.naive_passive else "")
    out = save(f"predict_bench{tag}", payload)
    cols = ["contender", "clients", "throughput_rps", "p50_ms", "p95_ms", "health_p99_ms", "errors"]
    print(table(rows, cols))
    print(f"speedup at {top} clients: {speedup}x; results: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
