"""Launch a rendered Space app locally (as Spaces would: its variables and the HF_TOKEN secret in the
environment, the local Hub as HF_ENDPOINT) and drive it in Debian's headless chromium through playwright
(never `playwright install`). Shared by the Space app tests and the live smoke test's tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ports import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def wait_http(url: str, proc: subprocess.Popen, log: Path, limit: float = 180) -> None:
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


@contextlib.contextmanager
def launched(folder: Path, variables: dict[str, str], hub_url: str, tmp: Path, token: str = "hf_read_alice"):
    """Run `python app.py` in the rendered Space folder on a free loopback port; yields its URL."""
    pytest.importorskip("gradio", reason="gradio is in the test extra: pip install -e .[test]")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE",))}
    env.update({"HF_HOME": str(tmp / "hf")})
    env.update(variables)
    env.update(
        {
            "HF_ENDPOINT": hub_url,
            "HF_TOKEN": token,
            "GRADIO_SERVER_NAME": "127.0.0.1",
            "GRADIO_SERVER_PORT": str(port),
            "GRADIO_ANALYTICS_ENABLED": "False",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
    )
    log = tmp / "app.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_http(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def browser_page(url: str) -> Iterator[object]:
    """A playwright page on `url` in headless Debian chromium."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed (./setup.sh --test installs it)"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(url)
            yield page
        finally:
            browser.close()


def keep_screenshots(tmp: Path, names: list[str]) -> None:
    """Copy screenshots to $LORASHIP_SCREENSHOTS when set (for looking at the app by eye)."""
    shots = os.environ.get("LORASHIP_SCREENSHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(tmp / name, Path(shots) / name)


def chat_once(page, prompt: str, timeout: float = 180_000) -> tuple[str, str]:
    """Type `prompt` into a chat template's box and wait for the final stats line; returns (stats, bot text)."""
    box = page.locator("#prompt textarea")
    box.fill(prompt)
    box.press("Enter")
    page.locator("#stats").get_by_text("tokens/s").wait_for(timeout=timeout)
    page.wait_for_function(
        (
            "() => document.querySelector('#stats').innerText.includes('first token') || "
            "document.querySelector('#stats').innerText.includes('error')"
        ),
        timeout=timeout,
    )
    stats = page.locator("#stats").inner_text()
    bot = page.locator("#chat .bot, #chat [data-testid='bot']").last.inner_text()
    return stats, bot
