"""bench/handover.py's page scenarios: Chromium on the checkout's own web page as the caller.

The page calls as a person would (its fake microphone a voice-like WAV, which the echo engine sends back); a
Playwright route rewrites every offer and answer it exchanges (POST /offer, and the new page's ICE restarts at
/sessions/{id}/offer) so that its media crosses a UdpRelay. An init script keeps every RTCPeerConnection the
page makes and, every 50 ms, notes when the audio energy received on any of them rose by more than a voiced
50 ms would bring: the page's "voiced" times, on the page's clock. Two scenarios:

    page-rebind  relay.rebind(): the server-facing port moves (a NAT rebinding). Chromium may renominate by
                 itself (it did before: about 1.7 s); the server may follow first.
    page-move    relay.move_caller_side(): the page's old path is dead and its new one is named only in an
                 answer to a later offer (Wi-Fi to cellular): the page must restart ICE or resume to come back.

Figures as the aiortc scenarios', plus when the page got its new path (the first answer after the event) and
how long after that the audio was back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from pathlib import Path

from abuse import Server, get_session, http_from
from net_relay import UdpRelay
from test_browser import launch_chromium, voice_wav

VOICED_ENERGY = 2e-5  # per 50 ms: a level of about 0.02 (-34 dBFS); the echoed voice is about 0.08
LEAD_S = 3.0

WATCH_PEERS = """
(() => {
  const Native = window.RTCPeerConnection;
  window.__pcs = [];
  window.__voiced = [];
  window.RTCPeerConnection = class extends Native {
    constructor(...args) { super(...args); window.__pcs.push(this); }
  };
  const energy = new Map();
  setInterval(async () => {
    for (const pc of window.__pcs) {
      if (pc.connectionState === "closed") continue;
      for (const s of (await pc.getStats()).values()) {
        if (s.type !== "inbound-rtp" || s.kind !== "audio") continue;
        const now = s.totalAudioEnergy || 0;
        if (now - (energy.get(pc) ?? now) > THRESHOLD) window.__voiced.push(performance.now() / 1000);
        energy.set(pc, now);
      }
    }
  }, 50);
})();
""".replace("THRESHOLD", str(VOICED_ENERGY))


class OfferRoute:
    """Every offer and answer of the page through `relay`; notes the session and when answers came."""

    def __init__(self, relay: UdpRelay):
        self.relay = relay
        self.session_id = ""
        self.answered: list[tuple[float, str, int]] = []  # (monotonic time, path, status)

    async def __call__(self, route) -> None:
        offer = json.loads(route.request.post_data)
        offer["sdp"] = self.relay.offer(offer["sdp"])
        response = await route.fetch(post_data=json.dumps(offer))
        answer = await response.json()
        if response.ok:
            answer["sdp"] = self.relay.answer(answer["sdp"])
            self.session_id = self.session_id or answer.get("session_id", "")
        self.answered.append((time.monotonic(), route.request.url.split("/", 3)[-1], response.status))
        await route.fulfill(response=response, json=answer)


async def voiced_on_monotonic(page, since_page: float, offset: float) -> list[float]:
    """The page's voiced times after `since_page` (page clock), as time.monotonic() values."""
    times = await page.evaluate(f"window.__voiced.filter(t => t > {since_page})")
    return [t - offset for t in times]


async def page_call(server: Server, name: str, scenario, longest_gap) -> dict:
    """One page scenario (see the module's notes); `longest_gap` is bench/handover.py's."""
    from playwright.async_api import async_playwright

    relay = await UdpRelay().start()
    route = OfferRoute(relay)
    with tempfile.TemporaryDirectory() as folder:
        wav = Path(folder) / "mic.wav"
        voice_wav(wav, seconds=180)
        async with async_playwright() as playwright:
            browser = await launch_chromium(playwright, wav)
            try:
                page = await browser.new_page()
                await page.add_init_script(WATCH_PEERS)
                await page.route("**/offer", route)
                await page.goto(server.url)
                await page.wait_for_selector("#call:not([disabled])")
                await page.click("#call")
                offset = await page.evaluate("performance.now() / 1000") - time.monotonic()
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:  # the echo, heard for a while before the event
                    voiced = await voiced_on_monotonic(page, 0, offset)
                    if voiced and voiced[-1] - voiced[0] > LEAD_S:
                        break
                    await asyncio.sleep(0.2)
                else:
                    return {"error": "the page never heard its echo"}
                event_at = time.monotonic()
                if scenario.page == "rebind":
                    await relay.rebind()
                else:
                    await relay.move_caller_side()
                window_end = event_at + scenario.window_s
                summary: dict = {}
                async with http_from("127.0.0.1") as http:
                    while time.monotonic() < window_end:
                        with contextlib.suppress(Exception):
                            summary = await get_session(http, server.url, route.session_id)
                        if summary.get("ended"):
                            break
                        await asyncio.sleep(1.0)
                message = await page.text_content("#message")
                voiced = await voiced_on_monotonic(page, 0, offset)
            finally:
                await browser.close()
    relay.close()
    gap, censored, back = longest_gap(voiced, event_at, window_end)
    new_path = next((t for t, _, status in route.answered if t > event_at and status == 200), None)
    back_after_new_path = next((t - new_path for t in voiced if new_path is not None and t > new_path), None)
    return {"gap_s": gap, "gap_censored": censored, "audio_back_after_s": back,
            "survived": not summary.get("ended") and summary.get("status") is None and back is not None,
            "ended": summary.get("ended"), "end_kind": summary.get("end_kind"), "end_reason": summary.get("end_reason"),
            "path_switches": summary.get("path_switches"), "ice_restarts": summary.get("ice_restarts"),
            "resumes": summary.get("resumes"), "moves": summary.get("moves"),
            "answers_after_event": [(round(t - event_at, 2), path, status) for t, path, status in route.answered
                                    if t > event_at],
            "audio_back_after_new_path_s": None if back_after_new_path is None else round(back_after_new_path, 3),
            "page_message": (message or "")[:200]}
