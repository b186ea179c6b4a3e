"""Stage 10, health: file, API, model and system checks against a served model.

Works against our own servers (serve stage), LM Studio (http://127.0.0.1:1234/v1), Ollama
(http://127.0.0.1:11434/v1) or any other OpenAI-compatible base URL. How a server is spoken to is its
serve engine's business (tasks/serve/engines/: each engine's `health_checks`): llama.cpp's server and
`health_check.base_url` speak OpenAI's API (`openai_checks`), the transformers engine's model API
answers /health, /info and /predict (`model_api_checks`). Checks:
- file: the GGUF opens (gguf.GGUFReader), its size and sha256 match the manifest record;
- api: the port answers; OpenAI: /v1/models lists the model; model API: /health is 200 and ready,
  /info names the task; response time, HTTP error codes;
- model: each test input gives a non-empty answer of at least `min_response_length` characters:
  OpenAI: each test prompt as a chat; model API: a request fitting the task (the test prompts for
  text tasks, `test_audio` for speech recognition, the server's own example otherwise); latency,
  tokens/s where the answer counts its tokens;
- system: free disk where the run lives, free memory, GPUs through nvidia-ml-py when installed.
Each check passes, warns or fails; the verdict is `unhealthy` if any check fails, `degraded` if any
warns, else `healthy`, with the reasons. The report is written as JSON + Markdown into the run's
reports folder and published as a Prefect markdown artifact (best effort).
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import requests
from pydantic import Field

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_dir
from tasks.core.constants import TEMPLATES_DIR
from tasks.core.settings import FILE_CONTENT, SecretRef, StrictModel
from tasks.core.stage import stage_task
from tasks.core.ui import artifact_key, publish_markdown
from tasks.core.vocab import ArtifactKind, HealthVerdict, Stage

STAGE = Stage.HEALTH
log = logging.getLogger("loraship.health")
Status = Literal["pass", "warn", "fail"]
#: The speech test input: a short English sentence spoken by espeak-ng, shipped with the asr Space template.
DEFAULT_TEST_AUDIO = TEMPLATES_DIR / "spaces" / "asr" / "examples" / "en_hello.wav"


class HealthSettings(StrictModel):
    """What a healthy endpoint must do."""

    base_url: str | None = Field(
        None,
        description=(
            "check this OpenAI-compatible endpoint instead of the served one, e.g. http://127.0.0.1:1234/v1 (LM "
            "Studio) or http://127.0.0.1:11434/v1 (Ollama)"
        ),
    )
    model_id: str | None = Field(None, description="model id expected in /v1/models (default: the served model's)")
    api_key: SecretRef | None = Field(
        None, description="bearer token reference for endpoints that need one, e.g. env:OPENAI_API_KEY"
    )
    test_prompts: list[str] = Field(
        default_factory=lambda: ["Hello!"],
        min_length=1,
        description="each must get an answer of at least min_response_length characters",
    )
    test_audio: Annotated[str | None, FILE_CONTENT] = Field(
        None,
        description=(
            "the WAV sent to a speech recognition model API (serving.engine: transformers); default: the asr "
            "Space template's examples/en_hello.wav"
        ),
    )
    min_response_length: int = Field(
        1, ge=1, description="shorter (non-empty) answers make the verdict degraded; empty ones unhealthy"
    )
    max_tokens: int = Field(32, ge=1, description="tokens generated per test prompt")
    timeout_s: float = Field(60.0, gt=0, description="per-request timeout")
    max_latency_s: float | None = Field(None, gt=0, description="a prompt slower than this makes the verdict degraded")
    min_free_disk_gb: float = Field(
        1.0, ge=0, description="less free disk in the run folder makes the verdict degraded"
    )
    min_free_memory_gb: float = Field(0.5, ge=0, description="less available memory makes the verdict degraded")
    verify_sha256: bool = Field(
        True, description="re-hash the GGUF and compare with the manifest (reads the whole file)"
    )
    fail_on_unhealthy: bool = Field(True, description="an unhealthy verdict fails the stage (after writing the report)")


def _check(group: str, name: str, status: Status, detail: str, **values: Any) -> dict[str, Any]:
    return {"group": group, "name": name, "status": status, "detail": detail, **values}


def file_checks(gguf: Artifact) -> list[dict[str, Any]]:
    out = []
    p = gguf.local_path
    if not p.is_file():
        return [_check("file", "exists", "fail", f"{p} is missing")]
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(p))
        out.append(
            _check(
                "file",
                "opens",
                "pass",
                f"GGUF v{reader.fields['GGUF.version'].parts[-1][0]} with {len(reader.tensors)} tensors",
            )
        )
    except Exception as exc:  # any parse error means a broken file
        out.append(_check("file", "opens", "fail", f"{p.name} does not open as GGUF: {type(exc).__name__}: {exc}"))
    size = p.stat().st_size
    out.append(
        _check(
            "file",
            "size",
            "pass" if size == gguf.size else "fail",
            f"{size} bytes" + ("" if size == gguf.size else f", manifest says {gguf.size}"),
            size=size,
        )
    )
    return out


def sha_check(gguf: Artifact) -> dict[str, Any]:
    problems = gguf.problems(full=True)
    return _check(
        "file",
        "sha256",
        "fail" if problems else "pass",
        "; ".join(problems) or f"matches the manifest ({gguf.sha256[:16]}…)",
    )


def api_checks(
    base_url: str, model_id: str | None, headers: dict[str, str], timeout: float
) -> tuple[list[dict[str, Any]], str | None]:
    """Reachability and /v1/models; returns the checks and the model id to use (None: unusable)."""
    t0 = time.perf_counter()
    try:
        r = requests.get(f"{base_url}/models", headers=headers, timeout=timeout)
    except requests.RequestException as exc:
        return [_check("api", "reachable", "fail", f"{base_url} does not answer: {type(exc).__name__}")], None
    ms = (time.perf_counter() - t0) * 1000
    out = [_check("api", "reachable", "pass", f"answered in {ms:.0f} ms", response_ms=round(ms, 1))]
    if r.status_code != 200:
        out.append(
            _check("api", "models", "fail", f"GET /models answered HTTP {r.status_code}", http_status=r.status_code)
        )
        return out, None
    try:
        ids = [m["id"] for m in r.json().get("data", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        out.append(_check("api", "models", "fail", "GET /models did not answer an OpenAI model list"))
        return out, None
    if model_id and model_id not in ids:
        out.append(
            _check(
                "api",
                "models",
                "fail",
                f"model {model_id!r} is not listed (listed: {', '.join(ids) or 'none'})",
                models=ids,
            )
        )
        return out, None
    if not ids:
        out.append(_check("api", "models", "fail", "no model is listed"))
        return out, None
    out.append(_check("api", "models", "pass", f"lists {', '.join(ids)}", models=ids))
    return out, model_id or ids[0]


def prompt_check(
    base_url: str, model_id: str, prompt: str, settings: HealthSettings, headers: dict[str, str]
) -> dict[str, Any]:
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": settings.max_tokens,
        "temperature": 0.0,
    }
    t0 = time.perf_counter()
    try:
        r = requests.post(f"{base_url}/chat/completions", json=body, headers=headers, timeout=settings.timeout_s)
    except requests.RequestException as exc:
        return _check("model", f"prompt: {prompt[:40]}", "fail", f"no answer: {type(exc).__name__}")
    latency = time.perf_counter() - t0
    if r.status_code != 200:
        return _check(
            "model",
            f"prompt: {prompt[:40]}",
            "fail",
            f"HTTP {r.status_code}: {r.text[:200]}",
            http_status=r.status_code,
        )
    try:
        data = r.json()
        answer = data["choices"][0]["message"].get("content") or ""
        tokens = int((data.get("usage") or {}).get("completion_tokens") or 0)
    except (ValueError, KeyError, IndexError, TypeError):
        return _check("model", f"prompt: {prompt[:40]}", "fail", "the answer is not an OpenAI chat completion")
    values = {
        "latency_s": round(latency, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / latency, 1) if latency > 0 else None,
        "answer_chars": len(answer),
        "answer": answer[:200],
    }
    name = f"prompt: {prompt[:40]}"
    if not answer.strip():
        return _check("model", name, "fail", "empty answer", **values)
    if len(answer.strip()) < settings.min_response_length:
        return _check(
            "model",
            name,
            "warn",
            (
                f"answer of {len(answer.strip())} characters, shorter than min_response_length "
                f"{settings.min_response_length}"
            ),
            **values,
        )
    if settings.max_latency_s and latency > settings.max_latency_s:
        return _check(
            "model", name, "warn", f"took {latency:.2f}s, over max_latency_s {settings.max_latency_s}", **values
        )
    return _check("model", name, "pass", f"{len(answer.strip())} characters in {latency:.2f}s", **values)


def openai_checks(
    base_url: str, model_id: str | None, settings: HealthSettings, headers: dict[str, str]
) -> tuple[list[dict[str, Any]], str | None]:
    """An OpenAI-compatible .../v1 endpoint: /models, then each test prompt as a chat completion."""
    checks, usable = api_checks(base_url, model_id, headers, settings.timeout_s)
    if usable:
        checks += [prompt_check(base_url, usable, p, settings, headers) for p in settings.test_prompts]
    return checks, usable


def _answer_text(result: Any) -> str:
    """The text of a /predict result: a transcript, generated text, a label...; else its JSON."""
    if isinstance(result, list):
        return " ".join(_answer_text(r) for r in result)
    if isinstance(result, dict):
        for key in ("text", "generated_text", "summary_text", "translation_text", "answer", "label", "token_str"):
            if isinstance(result.get(key), str):
                return result[key]
    return json.dumps(result) if result is not None else ""


def model_api_inputs(example: dict[str, Any], settings: HealthSettings) -> list[tuple[str, dict[str, Any]]]:
    """(label, request body) for each test input, shaped like the server's own /info example: a text task
    gets the test prompts, speech recognition the test WAV, any other task (images, QA) the example."""
    if "audio" in example:
        path = Path(settings.test_audio).expanduser() if settings.test_audio else DEFAULT_TEST_AUDIO
        return [(f"audio: {path.name}", {**example, "audio": base64.b64encode(path.read_bytes()).decode()})]
    if isinstance(example.get("text"), str):
        params = dict(example.get("parameters") or {})
        if "max_new_tokens" in params:
            params["max_new_tokens"] = settings.max_tokens
        return [
            (f"prompt: {p[:40]}", {**example, "text": p, **({"parameters": params} if params else {})})
            for p in settings.test_prompts
        ]
    return [("example: " + ", ".join(sorted(example))[:40], example)]


def predict_check(
    base_url: str, label: str, body: dict[str, Any], settings: HealthSettings, headers: dict[str, str]
) -> dict[str, Any]:
    """One POST /predict: an answer of at least min_response_length characters, within max_latency_s."""
    t0 = time.perf_counter()
    try:
        r = requests.post(f"{base_url}/predict", json=body, headers=headers, timeout=settings.timeout_s)
    except requests.RequestException as exc:
        return _check("model", label, "fail", f"no answer: {type(exc).__name__}")
    latency = time.perf_counter() - t0
    if r.status_code != 200:
        return _check("model", label, "fail", f"HTTP {r.status_code}: {r.text[:200]}", http_status=r.status_code)
    try:
        data = r.json()
        answer = _answer_text(data["result"])
    except (ValueError, KeyError, TypeError):
        return _check("model", label, "fail", "the answer is not a model API /predict response")
    values = {
        "latency_s": round(latency, 3),
        "inference_ms": data.get("inference_time_ms"),
        "answer_chars": len(answer),
        "answer": answer[:200],
    }
    if not answer.strip():
        return _check("model", label, "fail", "empty answer", **values)
    n = len(answer.strip())
    if n < settings.min_response_length:
        short = f"answer of {n} characters, shorter than min_response_length {settings.min_response_length}"
        return _check("model", label, "warn", short, **values)
    if settings.max_latency_s and latency > settings.max_latency_s:
        slow = f"took {latency:.2f}s, over max_latency_s {settings.max_latency_s}"
        return _check("model", label, "warn", slow, **values)
    return _check("model", label, "pass", f"{n} characters in {latency:.2f}s", **values)


def model_api_checks(
    base_url: str, model_id: str | None, settings: HealthSettings, headers: dict[str, str]
) -> tuple[list[dict[str, Any]], str | None]:
    """A model API server (tasks/model_api/server.py): /health ready, /info's task, then /predict with test
    inputs fitting that task. Returns the checks and the deployment's model id."""
    t0 = time.perf_counter()
    try:
        r = requests.get(f"{base_url}/health", headers=headers, timeout=settings.timeout_s)
    except requests.RequestException as exc:
        return [_check("api", "reachable", "fail", f"{base_url} does not answer: {type(exc).__name__}")], None
    ms = (time.perf_counter() - t0) * 1000
    out = [_check("api", "reachable", "pass", f"answered in {ms:.0f} ms", response_ms=round(ms, 1))]
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    if r.status_code != 200 or body.get("status") != "ok":
        why = body.get("error") or f"status {body.get('status', '?')}, {body.get('progress', '?')}%"
        out.append(_check("api", "health", "fail", f"GET /health answered HTTP {r.status_code} ({why})"))
        return out, None
    out.append(_check("api", "health", "pass", f"ready, up {body.get('uptime_s')} s", http_status=200))
    try:
        info = requests.get(f"{base_url}/info", headers=headers, timeout=settings.timeout_s).json()
        task, example, served = info["task"], info["example"], info.get("model_id")
    except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
        out.append(_check("api", "info", "fail", f"GET /info did not answer the model's task ({type(exc).__name__})"))
        return out, None
    if not isinstance(example, dict):
        out.append(_check("api", "info", "fail", f"GET /info has no example request for {task}"))
        return out, None
    out.append(_check("api", "info", "pass", f"{served} serves {task} on {info.get('device')}", task=task))
    out += [predict_check(base_url, label, b, settings, headers) for label, b in model_api_inputs(example, settings)]
    return out, model_id or served


def system_checks(disk_path: Path, settings: HealthSettings) -> list[dict[str, Any]]:
    import psutil

    out = []
    free_gb = shutil.disk_usage(disk_path).free / 1e9
    out.append(
        _check(
            "system",
            "disk",
            "pass" if free_gb >= settings.min_free_disk_gb else "warn",
            f"{free_gb:.1f} GB free at {disk_path}",
            free_gb=round(free_gb, 2),
        )
    )
    mem_gb = psutil.virtual_memory().available / 1e9
    out.append(
        _check(
            "system",
            "memory",
            "pass" if mem_gb >= settings.min_free_memory_gb else "warn",
            f"{mem_gb:.1f} GB available",
            available_gb=round(mem_gb, 2),
        )
    )
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append(
                _check(
                    "system",
                    f"gpu{i}",
                    "pass",
                    f"{pynvml.nvmlDeviceGetName(h)}: {mem.free / 1e9:.1f} of {mem.total / 1e9:.1f} GB free",
                    free_gb=round(mem.free / 1e9, 2),
                )
            )
        pynvml.nvmlShutdown()
    except Exception as exc:  # no NVML (not installed, no driver, no GPU): nothing to check
        out.append(_check("system", "gpu", "pass", f"no NVIDIA GPU checked ({type(exc).__name__})"))
    return out


def verdict_of(checks: list[dict[str, Any]]) -> tuple[HealthVerdict, list[str]]:
    fails = [f"{c['group']}/{c['name']}: {c['detail']}" for c in checks if c["status"] == "fail"]
    warns = [f"{c['group']}/{c['name']}: {c['detail']}" for c in checks if c["status"] == "warn"]
    verdict = HealthVerdict.UNHEALTHY if fails else HealthVerdict.DEGRADED if warns else HealthVerdict.HEALTHY
    return verdict, fails + warns


def check_health(
    base_url: str,
    settings: HealthSettings,
    model_id: str | None = None,
    gguf: Artifact | None = None,
    disk_path: Path | None = None,
    engine: str | None = None,
) -> dict[str, Any]:
    """Run every check against `base_url` and return the report. `engine` (a serving.engine name) says how
    to speak to it; None: an OpenAI-compatible .../v1 URL (health_check.base_url, LM Studio, Ollama)."""
    base_url = base_url.rstrip("/")
    headers = {}
    if settings.api_key is not None:
        headers["Authorization"] = f"Bearer {settings.api_key.resolve().get_secret_value()}"
    checks: list[dict[str, Any]] = []
    if gguf is not None:
        checks += file_checks(gguf)
        if settings.verify_sha256 and gguf.local_path.is_file():
            checks.append(sha_check(gguf))
    if engine is None:
        api, usable = openai_checks(base_url, model_id, settings, headers)
    else:
        from tasks.serve.engines import SERVE_ENGINES

        api, usable = SERVE_ENGINES.lookup(engine).health_checks(base_url, model_id, settings, headers)
    checks += api
    checks += system_checks(disk_path or Path.cwd(), settings)
    verdict, reasons = verdict_of(checks)
    prompts = [c for c in checks if c["group"] == "model" and "latency_s" in c]
    tps = [c["tokens_per_s"] for c in prompts if c.get("tokens_per_s")]
    chars = [c["answer_chars"] for c in prompts if "answer_chars" in c]
    return {
        "verdict": verdict,
        "reasons": reasons,
        "engine": engine,
        "base_url": base_url,
        "model_id": usable or model_id,
        "gguf": gguf.path if gguf else None,
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "summary": {
            "mean_latency_s": round(sum(c["latency_s"] for c in prompts) / len(prompts), 3) if prompts else None,
            "tokens_per_s": round(sum(tps) / len(tps), 1) if tps else None,
            "mean_answer_chars": round(sum(chars) / len(chars), 1) if chars else None,
        },
        "checks": checks,
    }


def to_markdown(report: dict[str, Any]) -> str:
    icon = {"pass": "✅", "warn": "⚠️", "fail": "❌"}
    lines = [
        f"# Health: **{report['verdict']}**",
        "",
        f"Endpoint `{report['base_url']}`, model `{report['model_id']}`, checked {report['checked_at']}.",
        "",
    ]
    if report["reasons"]:
        lines += ["Reasons:", ""] + [f"- {r}" for r in report["reasons"]] + [""]
    lines += ["| group | check | status | detail |", "| --- | --- | --- | --- |"]
    for c in report["checks"]:
        lines.append(
            f"| {c['group']} | {c['name'].replace('|', '/')} | {icon[c['status']]} {c['status']} | "
            f"{str(c['detail']).replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def health(
    settings: HealthSettings,
    out_dir: Path,
    base_url: str,
    model_id: str | None = None,
    gguf: Artifact | None = None,
    name: str = "report:health",
    engine: str | None = None,
) -> Artifact:
    """Check the endpoint, write out_dir/{health.json,health.md}, return the `report:health` record."""
    report = check_health(base_url, settings, model_id=model_id, gguf=gguf, disk_path=out_dir.parent, engine=engine)

    with atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)
        (tmp / "health.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "health.md").write_text(to_markdown(report))
    publish_markdown(
        artifact_key("health", report["model_id"] or "model"),
        to_markdown(report),
        f"Health of {report['model_id']} at {report['base_url']}: {report['verdict']}",
    )
    log.info(
        "health: %s%s",
        report["verdict"],
        "" if not report["reasons"] else " (" + "; ".join(report["reasons"][:3]) + ")",
    )
    return Artifact.from_path(
        out_dir,
        name=name,
        kind=ArtifactKind.REPORT,
        stage=STAGE,
        inputs=[gguf] if gguf else [],
        settings=settings,
        meta={
            "verdict": report["verdict"],
            "reasons": report["reasons"],
            "base_url": report["base_url"],
            "model_id": report["model_id"],
            "engine": report["engine"],
            "measured_at": report["checked_at"],
            **report["summary"],
        },
    )


@stage_task(STAGE, cache=False, retries=0)
def health_task(
    settings: HealthSettings,
    out_dir: Path,
    base_url: str,
    model_id: str | None = None,
    gguf: Artifact | None = None,
    engine: str | None = None,
) -> Artifact:
    return health(settings, out_dir, base_url, model_id, gguf, engine=engine)
