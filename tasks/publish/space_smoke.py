"""The live smoke test of a deployed Space: once it is RUNNING, the real gradio_client calls the app's API
(the template manifest's `smoke.api_name`) with one example, a prompt or an audio file, and checks that an
answer came back. Its length and latency go into the space stage's record and the run summary; a failure
makes the stage fail with the Space's last run-log lines (the run goes on degraded with
pipeline.continue_on_error), keeping the deploy record so the card still links the Space.

RUNNING only means the container started: a missing model file, a private repo without the read token or
a broken requirement shows up only when the app is asked something.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tasks.publish.space_templates import SpaceTemplate


class SmokeFailed(Exception):
    """The app did not answer the example (the message says how)."""


def example_input(template: SpaceTemplate, folder: Path, prompts: list[str]) -> str:
    """The example the smoke test sends: the first prompt, or the first audio file the Space ships."""
    m = template.manifest
    if m.smoke.input == "text":
        if not prompts:
            raise SmokeFailed("no example prompt to send (space.examples is empty)")
        return prompts[0]
    files = sorted(p for p in (folder / m.smoke.examples_dir).glob("*") if p.is_file()) if m.smoke.examples_dir else []
    if not files:
        raise SmokeFailed(f"the {template.name} Space ships no example audio in {m.smoke.examples_dir or '(none)'}")
    return str(files[0])


def answer_text(output: Any, kind: str) -> str:
    """The answer inside the endpoint's output: the last chat message (`chat`) or the first output (`text`)."""
    first = output[0] if isinstance(output, (list, tuple)) and output else output
    if kind == "chat":
        messages = first if isinstance(first, list) else []
        last = messages[-1] if messages else {}
        content = last.get("content", "") if isinstance(last, dict) else ""
        if isinstance(content, list):  # Gradio 6 messages: [{"type": "text", "text": ...}]
            content = "".join(c.get("text", "") if isinstance(c, dict) else str(c) for c in content)
        return str(content)
    return "" if first is None else str(first)


def smoke_test(
    src: str, template: SpaceTemplate, example: str, *, token: str | None = None, timeout: float = 600
) -> dict[str, Any]:
    """Call the app at `src` (a Space id, or the app's URL) once; returns the record, raises SmokeFailed."""
    from gradio_client import Client, handle_file

    spec = template.manifest.smoke
    started = time.perf_counter()
    try:
        client = Client(src, token=token, verbose=False, download_files=False, analytics_enabled=False)
    except Exception as exc:
        raise SmokeFailed(f"gradio_client could not connect to {src}: {type(exc).__name__}: {exc}") from exc
    connected = time.perf_counter()
    arg = handle_file(example) if spec.input == "audio" else example
    try:
        output = client.submit(arg, *spec.extra_args, api_name=spec.api_name).result(timeout=timeout)
    except Exception as exc:
        raise SmokeFailed(f"{spec.api_name} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        client.close()
    done = time.perf_counter()
    answer = answer_text(output, spec.answer)
    record = {
        "ok": True,
        "api_name": spec.api_name,
        "input": spec.input,
        "example": Path(example).name if spec.input == "audio" else example[:80],
        "answer_chars": len(answer),
        "answer_preview": answer[:120],
        "latency_s": round(done - connected, 3),
        "connect_s": round(connected - started, 3),
    }
    if not answer.strip():
        raise SmokeFailed(f"{spec.api_name} answered nothing to {record['example']!r}")
    if spec.error_marker and answer.lstrip().startswith(spec.error_marker):
        raise SmokeFailed(f"{spec.api_name} answered with an error: {answer[:300]}")
    return record


def smoke_line(record: dict[str, Any]) -> str:
    """One line for the run summary."""
    if not record.get("ok"):
        return f"smoke test FAILED: {record.get('error', '')}"
    return (
        f"smoke test {record['api_name']}: {record['answer_chars']} chars in {record['latency_s']:.2f} s "
        f"(connect {record['connect_s']:.2f} s)"
    )
