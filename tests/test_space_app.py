"""The rendered Space app, launched locally on 127.0.0.1 against a GGUF pushed to the local Hub, in headless Chromium.

Real components end to end: the app downloads the GGUF from the local Hub server with hf_hub_download
(HF_ENDPOINT + the read token as HF_TOKEN, as on Spaces), runs it with llama-cpp-python, and Debian's
chromium (driven by playwright, never `playwright install`) types a prompt and reads the reply.
"""

from __future__ import annotations

import shutil

import pytest
from pydantic import SecretStr

from tests.space_apps import browser_page, chat_once, keep_screenshots, launched

pytestmark = pytest.mark.slow


def test_space_app_chats_in_chromium(tmp_path, hub_server, llama_ggufs):
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

    with launched(
        folder, space_variables(settings, pushed.meta["repo_id"], gguf.name, "Tiny chat"), hub_server.url, tmp_path
    ) as url:
        with browser_page(url) as page:
            page.get_by_text("Tiny chat").first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "space_loaded.png"), full_page=True)
            page.get_by_text("Hello there").first.wait_for(timeout=30_000)  # the example prompt is shown
            stats, bot = chat_once(page, "Tell me a story", timeout=120_000)
            chat = page.locator("#chat").inner_text()
            assert "error" not in stats.lower(), chat
            assert "Tell me a story" in chat
            assert bot.strip() and "Error" not in bot, chat
            page.screenshot(path=str(tmp_path / "space_chat.png"), full_page=True)
            box = page.locator("#prompt textarea")
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
        keep_screenshots(tmp_path, ["space_loaded.png", "space_chat.png", "space_rate_limit.png"])
    downloads = hub_server.state.calls("GET", r"/alice/llama-GGUF/resolve/main/llama-Q4_K_M.gguf")
    assert downloads and downloads[-1].authorized_as == "alice", "the app fetched the private GGUF with the read token"


def _merged_repo(tmp_path, hub_server, base, repo: str = "alice/llama") -> str:
    """A tiny model's folder pushed as a private merged (transformers) repo; returns its id."""
    from tasks.publish.hub_io import push_folder
    from tasks.support.tiny_models import copy_tree

    merged = copy_tree(base, tmp_path / "merged" / repo.split("/")[1])
    for marker in merged.glob(".*"):
        marker.unlink()
    push_folder(
        merged,
        repo,
        token="hf_write_alice",
        endpoint=hub_server.url,
        private=True,
        commit_message="merged model",
    )
    return repo


def test_transformers_chat_streams_in_chromium_on_zero_gpu_path(tmp_path, hub_server, llama_base):
    """transformers_chat: the merged repo run with transformers; ZERO_GPU=1 wraps generation in the real
    spaces.GPU (a no-op off ZeroGPU hardware), tokens are streamed to the page and to gradio_client."""
    from gradio_client import Client

    from tasks.publish.space import SpaceSettings, space_inputs
    from tasks.publish.space_templates import SPACE_TEMPLATES

    repo = _merged_repo(tmp_path, hub_server, llama_base)
    template = SPACE_TEMPLATES["transformers_chat"]
    settings = SpaceSettings(template="transformers_chat", hardware="zero-a10g", examples=["Hi"], max_tokens=24)
    inputs = space_inputs(settings, repo, "", "Tiny transformers chat", f"{hub_server.url}/{repo}")
    folder = template.render_to(tmp_path / "space", inputs, "apache-2.0")
    variables = template.variables(inputs)
    assert variables["ZERO_GPU"] == "1" and variables["MODEL_REPO"] == repo and "MODEL_FILE" not in variables
    with launched(folder, variables, hub_server.url, tmp_path) as url:
        with browser_page(url) as page:
            page.get_by_text("Tiny transformers chat").first.wait_for(timeout=60_000)
            page.get_by_text("ZeroGPU").first.wait_for(timeout=10_000)
            stats, bot = chat_once(page, "Tell me a story")
            chat = page.locator("#chat").inner_text()
            assert "error" not in stats.lower() and "Error" not in bot, chat
            assert bot.strip() and "Tell me a story" in chat
            n = int(stats.split(" tokens")[0])
            assert 0 < n <= 24, stats
            page.screenshot(path=str(tmp_path / "transformers_chat.png"), full_page=True)
        keep_screenshots(tmp_path, ["transformers_chat.png"])
        # streamed: the endpoint yields after every generated token (TextIteratorStreamer releases the text a
        # word at a time, so the token count in the stats is what grows one by one), then the final answer
        job = Client(url, verbose=False).submit("Once upon a time", [], api_name="/chat")
        job.result(timeout=180)
        counts = [int(out[2].split(" tokens")[0]) for out in job.outputs() if " tokens" in str(out[2])]
        assert len(set(counts)) >= 3 and counts == sorted(counts), f"the answer was not streamed: {counts}"
        final = job.outputs()[-1][0][-1]["content"]
        assert "Error" not in str(final) and str(final).strip(), final
    downloads = hub_server.state.calls("GET", r"/alice/llama/resolve/[^/]+/model.safetensors")
    assert downloads and downloads[-1].authorized_as == "alice", "the app fetched the private repo with the read token"


def test_asr_transcribes_an_espeak_wav_in_chromium(tmp_path, hub_server):
    """asr: a WAV spoken here by espeak-ng is uploaded in chromium and transcribed by the tiny wav2vec2 CTC
    model (pushed as a private merged repo) with its timing; a CTC model offers no language menu; the
    shipped example audio answers the smoke test's /transcribe call through gradio_client."""
    import subprocess

    from tasks.publish.space import SpaceSettings, space_inputs
    from tasks.publish.space_smoke import example_input, smoke_test
    from tasks.publish.space_templates import SPACE_TEMPLATES
    from tests.asr_models import tiny_wav2vec2

    espeak = shutil.which("espeak-ng")
    assert espeak, "espeak-ng is needed (./setup.sh --test installs it)"
    said = tmp_path / "said.wav"
    subprocess.run([espeak, "-v", "en", "-w", str(said), "The quick brown fox jumps over the lazy dog."], check=True)
    repo = _merged_repo(tmp_path, hub_server, tiny_wav2vec2(), "alice/tiny-asr")
    template = SPACE_TEMPLATES["asr"]
    settings = SpaceSettings(template="asr", examples=[])
    inputs = space_inputs(settings, repo, "", "Tiny ASR", f"{hub_server.url}/{repo}")
    folder = template.render_to(tmp_path / "space", inputs, "apache-2.0")
    assert sorted(p.name for p in (folder / "examples").iterdir()) == ["en_hello.wav", "fr_bonjour.wav"]
    with launched(folder, template.variables(inputs), hub_server.url, tmp_path) as url:
        with browser_page(url) as page:
            page.get_by_text("Tiny ASR").first.wait_for(timeout=60_000)
            assert not page.locator("#language").is_visible(), "wav2vec2 offers no language choice"
            page.locator("#audio input[type=file]").set_input_files(str(said))
            page.locator("#transcribe").click()
            page.locator("#timing").get_by_text("real time").wait_for(timeout=180_000)
            timing = page.locator("#timing").inner_text()
            text = page.locator("#text textarea").input_value()
            assert text.strip() and not text.startswith("⚠️"), text
            seconds = float(timing.split(" s of audio")[0])
            assert 2.0 < seconds < 6.0, timing  # espeak-ng's sentence, resampled to 16 kHz
            page.screenshot(path=str(tmp_path / "asr.png"), full_page=True)
        keep_screenshots(tmp_path, ["asr.png"])
        record = smoke_test(url, template, example_input(template, folder, []), timeout=120)
        assert record["ok"] and record["example"] == "en_hello.wav" and record["answer_chars"] > 0


def test_asr_offers_the_languages_of_a_multilingual_whisper(tmp_path, hub_server):
    """asr with a (tiny, random) multilingual-style Whisper: the language menu lists the languages of its
    generation config, and a transcription with a chosen language comes back with its timing."""
    from tasks.publish.space import SpaceSettings, space_inputs
    from tasks.publish.space_templates import SPACE_TEMPLATES
    from tests.asr_models import tiny_whisper

    repo = _merged_repo(tmp_path, hub_server, tiny_whisper(), "alice/tiny-whisper")
    template = SPACE_TEMPLATES["asr"]
    settings = SpaceSettings(template="asr", language="en", max_tokens=8)
    inputs = space_inputs(settings, repo, "", "Tiny Whisper", "")
    folder = template.render_to(tmp_path / "space", inputs, "apache-2.0")
    with launched(folder, template.variables(inputs), hub_server.url, tmp_path) as url:
        with browser_page(url) as page:
            page.get_by_text("Tiny Whisper").first.wait_for(timeout=60_000)
            menu = page.locator("#language input")
            menu.wait_for(timeout=10_000)
            assert menu.input_value() == "en", "space.language preselects the language"
            menu.click()
            options = page.get_by_role("option")
            options.first.wait_for(timeout=10_000)
            listed = sorted(o.replace("✓", "").strip() for o in options.all_inner_texts())  # ✓ marks the chosen
            assert listed == ["auto", "en", "fr"], listed
            page.get_by_role("option", name="fr").click()
            page.locator("#audio input[type=file]").set_input_files(str(folder / "examples" / "fr_bonjour.wav"))
            page.locator("#transcribe").click()
            page.locator("#timing").get_by_text("real time").wait_for(timeout=180_000)
            text = page.locator("#text textarea").input_value()
            assert text.strip() and not text.startswith("⚠️"), text
