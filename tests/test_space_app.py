"""The rendered Space app, launched locally on 127.0.0.1 against a GGUF pushed to the local Hub, in headless Chromium.

Real components end to end: the app downloads the GGUF from the local Hub server with hf_hub_download
(HF_ENDPOINT + the read token as HF_TOKEN, as on Spaces), runs it with llama-cpp-python, and Debian's
chromium (driven by playwright, never `playwright install`) types a prompt and reads the reply.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, limit: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the app did not answer on {url}:\n{log.read_text()[-3000:]}")


def test_space_app_chats_in_chromium(tmp_path, hub_server, llama_ggufs):
    pytest.importorskip("gradio", reason="gradio is in the test extra: pip install -e .[test]")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed (./setup.sh --test installs it)"
    from tasks.core.artifacts import Artifact
    from tasks.publish.card import CardSettings
    from tasks.publish.hub_push import HubSettings, hub_push
    from tasks.publish.space import SpaceSettings, render_space, space_variables

    q = "Q4_K_M"
    gguf = tmp_path / "gguf" / f"llama-{q}.gguf"
    gguf.parent.mkdir()
    shutil.copyfile(llama_ggufs[q], gguf)
    art = Artifact.from_path(gguf, name=f"gguf:{q}", kind="gguf", stage="quantize", meta={"quant": q})
    pushed = hub_push(
        [art],
        HubSettings(endpoint=hub_server.url, private=True),
        CardSettings(),
        tmp_path / "publish",
        tmp_path / "reports",
        model_name="llama",
        version="v1",
        token=SecretStr("hf_write_alice"),
    )
    settings = SpaceSettings(examples=["Hello there"], max_tokens=24, rate_limit_per_minute=3)
    folder = render_space(
        tmp_path / "space",
        settings=settings,
        model_repo=pushed.meta["repo_id"],
        model_file=gguf.name,
        model_url="x",
        title="Tiny chat",
        license="apache-2.0",
    )

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE",))}
    env.update(space_variables(settings, pushed.meta["repo_id"], gguf.name, "Tiny chat"))
    env.update(
        {
            "HF_ENDPOINT": hub_server.url,
            "HF_TOKEN": "hf_read_alice",
            "HF_HOME": str(tmp_path / "hf"),
            "GRADIO_SERVER_NAME": "127.0.0.1",
            "GRADIO_SERVER_PORT": str(port),
            "GRADIO_ANALYTICS_ENABLED": "False",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
    )
    log = tmp_path / "app.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_http(url, proc, log)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=[
                    "--no-sandbox",
                    "--headless",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                ],
            )
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(url)
            page.get_by_text("Tiny chat").first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "space_loaded.png"), full_page=True)
            page.get_by_text("Hello there").first.wait_for(timeout=30_000)  # the example prompt is shown
            box = page.locator("#prompt textarea")
            box.fill("Tell me a story")
            box.press("Enter")
            page.locator("#stats").get_by_text("tokens/s").wait_for(timeout=120_000)
            page.wait_for_function(
                (
                    "() => document.querySelector('#stats').innerText.includes('first token') || "
                    "document.querySelector('#stats').innerText.includes('error')"
                ),
                timeout=120_000,
            )
            stats = page.locator("#stats").inner_text()
            chat = page.locator("#chat").inner_text()
            assert "error" not in stats.lower(), chat
            assert "Tell me a story" in chat
            bot = page.locator("#chat .bot, #chat [data-testid='bot']").last.inner_text()
            assert bot.strip() and "Error" not in bot, chat
            page.screenshot(path=str(tmp_path / "space_chat.png"), full_page=True)
            # the per-session rate limit (3 per minute here) answers in the chat instead of failing
            for i in range(3):
                box.fill(f"again {i}")
                box.press("Enter")
                page.wait_for_function(
                    (
                        f"() => document.querySelector('#chat').innerText.includes('again {i}') && "
                        "!document.querySelector('#stats').innerText.includes('thinking')"
                    ),
                    timeout=120_000,
                )
                page.wait_for_function(
                    (
                        "() => document.querySelector('#stats').innerText.includes('first token') || "
                        "document.querySelector('#stats').innerText.includes('rate limited')"
                    ),
                    timeout=120_000,
                )
            page.get_by_text("Rate limit").first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "space_rate_limit.png"), full_page=True)
            browser.close()
        shots = os.environ.get("LORASHIP_SCREENSHOTS")
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            for name in ("space_loaded.png", "space_chat.png", "space_rate_limit.png"):
                shutil.copyfile(tmp_path / name, Path(shots) / name)
        downloads = hub_server.state.calls("GET", r"/alice/llama-GGUF/resolve/main/llama-Q4_K_M.gguf")
        assert downloads and downloads[-1].authorized_as == "alice", (
            "the app fetched the private GGUF with the read token"
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
