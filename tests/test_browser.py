"""A real Chromium calls the server: fake microphone from a WAV, the page's own buttons.

Screenshots of the page mid-call, at desktop and phone sizes, are saved under
test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest

from server.caller import write_wav

CHROMIUM = shutil.which("chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required",
    "--allow-loopback-in-peer-connection",  # the tests run where loopback is the only network
]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (./run test installs it)")


def voice_wav(path: Path, seconds: float = 8.0, rate: int = 48000) -> float:
    """A voice-like test signal (a gliding 200 Hz tone at a syllable rate); returns its RMS."""
    t = np.arange(int(seconds * rate)) / rate
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 3 * t)
    glide = np.sin(2 * np.pi * 200 * t * (1 + 0.15 * np.sin(2 * np.pi * 0.4 * t)))
    audio = (0.15 * envelope * glide).astype(np.float32)
    write_wav(path, audio, rate)
    return float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))


async def launch_chromium(playwright, wav: Path, extra: list[str] | None = None):
    return await playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={wav}", *(extra or [])],
    )


async def press_call(browser, url: str, viewport: dict | None = None):
    """Open the page, wait until it may call, press Call; returns the page."""
    page = await browser.new_page(viewport=viewport)
    await page.goto(url)
    await page.wait_for_selector("#call:not([disabled])")
    await page.click("#call")
    return page


async def test_chromium_calls_the_server_from_the_page(tiny_server, tmp_path):
    from playwright.async_api import async_playwright

    wav_rms = voice_wav(tmp_path / "mic.wav")
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as playwright:
        browser = await launch_chromium(playwright, tmp_path / "mic.wav")
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await page.goto(tiny_server.url)
        banner = page.locator("#test-banner")
        await page.wait_for_selector("#call:not([disabled])")
        assert "babbles" in await banner.text_content() and await banner.is_visible()
        assert not await page.is_visible("#persona")  # Moshi takes no persona: nothing to choose

        await page.click("#call")
        await page.wait_for_function("document.getElementById('transcript').textContent.trim().length > 15",
                                     timeout=20_000)
        session = next(iter(tiny_server.service.sessions.values()))
        await page.screenshot(path=str(ARTIFACTS / "call-desktop.png"))
        await page.set_viewport_size({"width": 390, "height": 844})
        await page.screenshot(path=str(ARTIFACTS / "call-phone.png"))

        stats = await page.evaluate("window.moshiCall.stats()")
        assert stats["audioEnergy"] and stats["audioEnergy"] > 0.01  # the page played a non-silent reply
        assert await page.text_content("#stat-state") == "connected"

        # What reached the engine is the WAV at its level (echo cancellation must not eat it).
        level_db = 20 * np.log10(session.stats.mean_input_rms / wav_rms)
        assert abs(level_db) < 3.0, (session.stats.mean_input_rms, wav_rms)

        await page.click("#hangup")
        await asyncio.wait_for(session.ended.wait(), 30)  # a guard against a hang, not a timing
        assert session.end_kind != "no_media"  # ended by the page's hang-up, not by the media timeout
        assert tiny_server.engine.free_slots == 2 and not tiny_server.service.sessions
        assert "hung up" in await page.text_content("#message")
        await browser.close()
    assert (ARTIFACTS / "call-desktop.png").stat().st_size > 10_000


async def test_the_page_calls_with_the_persona_typed_and_picked(tmp_path):
    from conftest import start_server, stop_server
    from playwright.async_api import async_playwright

    from server.engine.setup import create_engine
    from server.model.moshi_step import GREEDY
    from server.model.source import ModelSource

    voice_wav(tmp_path / "mic.wav")
    engine = create_engine(ModelSource("tiny-persona"), max_calls=1, sampling=GREEDY, cpu_threads=1,
                           max_backlog_frames=25)
    server = await start_server(engine)
    prompt = "You are a cheerful pirate who loves the sea."
    async with async_playwright() as playwright:
        browser = await launch_chromium(playwright, tmp_path / "mic.wav")
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await page.goto(server.url)
        await page.wait_for_selector("#call:not([disabled])")
        assert await page.is_visible("#persona")
        assert "teacher" in await page.input_value("#persona-prompt")  # the server's default, editable
        assert await page.input_value("#persona-voice") == "test-high"
        await page.fill("#persona-prompt", prompt)
        await page.select_option("#persona-voice", "test-low")
        await page.click("#call")
        await page.wait_for_function("document.getElementById('message').textContent.includes('role read')",
                                     timeout=20_000)
        await page.wait_for_function("document.getElementById('transcript').textContent.trim().length > 5",
                                     timeout=20_000)
        session = next(iter(server.service.sessions.values()))
        tokens = len(server.engine.prompt_book.prompt_tokens(prompt))
        assert session.call.prompt.description.startswith(f"voice=test-low prompt_tokens={tokens} ")
        assert await page.is_disabled("#persona-prompt")  # a persona is chosen before the call
        await page.wait_for_function("(window.moshiCall.lastStats || {}).audioEnergy > 0.01", timeout=10_000)
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "persona-desktop.png"))
        await page.click("#hangup")
        await browser.close()
    await stop_server(server)


async def test_the_page_sends_the_token_from_its_address(tmp_path):
    from conftest import start_server, stop_server
    from playwright.async_api import async_playwright

    from server.engine.setup import create_engine
    from server.model.source import ModelSource
    from signaling.app import SignalingConfig

    voice_wav(tmp_path / "mic.wav", seconds=3)
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1), SignalingConfig(api_token="s3cret"))
    async with async_playwright() as playwright:
        browser = await launch_chromium(playwright, tmp_path / "mic.wav")
        page = await browser.new_page()
        await page.goto(server.url)
        await page.wait_for_function("document.getElementById('message').textContent.includes('access token')")
        assert await page.is_disabled("#call")
        page = await press_call(browser, server.url + "/#token=s3cret")
        await page.wait_for_function("document.getElementById('stat-state').textContent === 'connected'")
        await page.wait_for_function("(window.moshiCall.lastStats || {}).audioEnergy > 0.01", timeout=10_000)
        await page.click("#hangup")
        await browser.close()
    await stop_server(server)


async def test_the_page_says_when_the_line_is_busy(tmp_path):
    from conftest import start_server, stop_server
    from playwright.async_api import async_playwright

    from server.caller import place_call
    from server.engine.setup import create_engine
    from server.model.source import ModelSource

    voice_wav(tmp_path / "mic.wav", seconds=2)
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1))
    holder = asyncio.ensure_future(place_call(server.url, np.zeros(48000 * 4, np.float32), tail_s=0))
    while not server.service.sessions:
        await asyncio.sleep(0.01)
    async with async_playwright() as playwright:
        browser = await launch_chromium(playwright, tmp_path / "mic.wav")
        page = await press_call(browser, server.url)
        await page.wait_for_function("document.getElementById('message').textContent.includes('busy')")
        assert "Try again in 5 s" in await page.text_content("#message")
        await browser.close()
    await holder
    await stop_server(server)


@pytest.mark.skipif(shutil.which("turnserver") is None, reason="Debian's coturn is not installed")
async def test_chromium_calls_through_the_turn_relay_only(coturn, tmp_path):
    """The page takes iceTransportPolicy "relay" and short-lived credentials from /ice-servers."""
    from conftest import TURN_SECRET, start_server, stop_server
    from playwright.async_api import async_playwright

    from server.engine.setup import create_engine
    from server.media.ice import IceConfig
    from server.model.source import ModelSource
    from signaling.app import SignalingConfig

    voice_wav(tmp_path / "mic.wav")
    ice = IceConfig(turn_urls=(coturn.url,), turn_secret=TURN_SECRET, turn_ttl_s=600, relay_only=True)
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1), SignalingConfig(ice=ice))
    async with async_playwright() as playwright:
        browser = await launch_chromium(playwright, tmp_path / "mic.wav")
        page = await press_call(browser, server.url)
        await page.wait_for_function("document.getElementById('stat-state').textContent === 'connected'")
        # The echo of the browser's own voice, back through the relay both ways.
        await page.wait_for_function("(window.moshiCall.lastStats || {}).audioEnergy > 0.05", timeout=15_000)
        pair = await page.evaluate("""async () => {
            const report = await window.moshiCall.pc.getStats();
            const pairs = [...report.values()].filter(s => s.type === 'candidate-pair' && s.nominated);
            const local = report.get(pairs[0].localCandidateId), remote = report.get(pairs[0].remoteCandidateId);
            return {local: local.candidateType, remote: remote.candidateType,
                    policy: window.moshiCall.pc.getConfiguration().iceTransportPolicy};
        }""")
        assert pair == {"local": "relay", "remote": "relay", "policy": "relay"}
        session = next(iter(server.service.sessions.values()))
        assert session.stats.mean_input_rms > 0.01  # the browser's voice reached the engine via coturn
        await page.click("#hangup")
        await browser.close()
    assert len(coturn.allocations()) >= 2
    await stop_server(server)
