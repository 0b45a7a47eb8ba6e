"""A real Firefox (Debian's firefox-esr, headless, over Marionette) calls the server.

Firefox's fake microphone (`media.navigator.streams.fake`) is a steady sine tone. With the echo engine,
hearing that same tone come back in Firefox proves audio both ways; the tiny model's text proves the
transcript. Calls go through our own page (POST /offer) and through WHIP from a script in the page.
"""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest
from firefox import MISSING, Firefox

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

HANG_GUARD_S = 60  # a guard against a hang, not a timing under test

# The page's Hang up sends DELETE /sessions/{id} and waits for it before closing its peer connection
# (whose RTCP BYE would otherwise reach the server first and end the call as a vanished caller).
PAGE_HANG_UP = {"hung_up"}

# The dominant frequency of a MediaStream (a JavaScript expression naming it), heard through a WebAudio
# analyser: waits until the stream carries sound (a spectral peak over -60 dBFS), then returns the
# peak's frequency in Hz (bins of sampleRate / 8192: 5.4 Hz at the sound server's 44.1 kHz). Firefox's
# fake microphone is a 1 kHz tone.
DOMINANT_HZ = """
const stream = eval(arguments[0]);
const context = new AudioContext();
await context.resume();
const analyser = context.createAnalyser();
analyser.fftSize = 8192;
context.createMediaStreamSource(stream).connect(analyser);
const bins = new Float32Array(analyser.frequencyBinCount);
for (;;) {
  await new Promise((r) => requestAnimationFrame(r));
  analyser.getFloatFrequencyData(bins);
  let peak = 0;
  for (let i = 1; i < bins.length; i++) if (bins[i] > bins[peak]) peak = i;
  if (bins[peak] > -60) { await context.close(); return peak * context.sampleRate / analyser.fftSize; }
}
"""

INBOUND_AUDIO = """
const report = await eval(arguments[0]).getStats();
const inbound = [...report.values()].find((s) => s.type === 'inbound-rtp' && s.kind === 'audio');
return inbound ? {packetsReceived: inbound.packetsReceived, audioLevel: inbound.audioLevel,
                  totalAudioEnergy: inbound.totalAudioEnergy} : null;
"""


@pytest.fixture
async def firefox(tmp_path):
    async with Firefox(tmp_path) as browser:
        yield browser


async def until(condition, what: str) -> None:
    """Wait for a condition on the server's side, with a hang guard."""
    async def check():
        while not condition():
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(check(), HANG_GUARD_S)
    except TimeoutError:
        raise AssertionError(f"still waiting for {what} after {HANG_GUARD_S} s") from None


async def call_from_page(firefox: Firefox, server):
    """Open our page in Firefox, press Call, wait until connected; returns the server's session."""
    await firefox.allow_microphone(server.url)
    await firefox.navigate(server.url)
    await firefox.wait_for("!document.getElementById('call').disabled")
    await firefox.run("document.getElementById('call').click()")
    await firefox.wait_for("document.getElementById('stat-state').textContent === 'connected'", HANG_GUARD_S)
    session_id = await firefox.run("return window.moshiCall.sessionId")
    return server.service.sessions[session_id]


def errors_logged(caplog) -> list[str]:
    gc.collect()  # a task that failed unobserved is reported when it is collected
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]



async def assert_audio_both_ways(firefox, session, mic: str, remote: str, pc: str) -> None:
    """Firefox's microphone reaches the engine, and the tone Firefox hears back is the tone it sends
    (`mic`, `remote`, `pc`: JavaScript expressions naming its streams and peer connection)."""
    await until(lambda: session.call.stats.frames_in >= 25, "2 s of Firefox's audio at the engine")
    assert session.stats.mean_input_rms > 0.01
    sent_hz = await firefox.run_async(DOMINANT_HZ, mic)
    heard_hz = await firefox.run_async(DOMINANT_HZ, remote)
    assert sent_hz > 100 and abs(heard_hz - sent_hz) < 20, (sent_hz, heard_hz)
    inbound = await firefox.run_async(INBOUND_AUDIO, pc)
    assert inbound["packetsReceived"] > 0 and inbound["audioLevel"] > 0.01

async def test_firefox_calls_from_the_page_and_hears_its_own_voice_back(echo_server, firefox):
    session = await call_from_page(firefox, echo_server)
    assert "echo engine" in await firefox.run("return document.getElementById('test-banner').textContent")
    # Firefox's microphone reaches the engine ...
    # Firefox's microphone reaches the engine and comes back: the tone it hears is the tone it sends.
    await assert_audio_both_ways(firefox, session, "window.moshiCall.mic", "window.moshiCall.remoteStream",
                                 "window.moshiCall.pc")
    assert session.summary()["outbound_frames_sent"] > 0

    await firefox.run("document.getElementById('hangup').click()")
    await asyncio.wait_for(session.ended.wait(), HANG_GUARD_S)
    assert session.end_kind in PAGE_HANG_UP, session.end_reason  # not the media timeout
    assert "hung up" in await firefox.run("return document.getElementById('message').textContent")
    assert echo_server.engine.free_slots == 2 and not echo_server.service.sessions


async def test_firefox_page_shows_what_the_model_says(tiny_server, firefox):
    session = await call_from_page(firefox, tiny_server)
    assert "babbles" in await firefox.run("return document.getElementById('test-banner').textContent")
    await firefox.wait_for("document.getElementById('transcript').textContent.trim().length > 15", HANG_GUARD_S)
    assert session.call.stats.text_pieces > 0
    assert session.stats.mean_input_rms > 0.01  # Firefox's tone reached the model
    # The model's audio reached Firefox and was decoded there.
    await firefox.wait_for("(window.moshiCall.lastStats || {}).audioEnergy > 0", HANG_GUARD_S)
    inbound = await firefox.run_async(INBOUND_AUDIO, "window.moshiCall.pc")
    assert inbound["packetsReceived"] > 0
    await firefox.run("document.getElementById('hangup').click()")
    await asyncio.wait_for(session.ended.wait(), HANG_GUARD_S)
    assert session.end_kind in PAGE_HANG_UP, session.end_reason


# WHIP from a script in the page: a complete offer (Firefox's candidates in it), the 201 answer applied,
# the `events` channel offered as any client may. Firefox's objects stay on `window.whip`.
WHIP_CALL = """
const mic = await navigator.mediaDevices.getUserMedia({audio: true});
const pc = new RTCPeerConnection();
const whip = window.whip = {pc, mic, remote: null, events: []};
mic.getTracks().forEach((track) => pc.addTrack(track, mic));
pc.createDataChannel('events').onmessage = (m) => whip.events.push(JSON.parse(m.data));
pc.ontrack = (e) => { whip.remote = e.streams[0] || new MediaStream([e.track]); };
await pc.setLocalDescription(await pc.createOffer());
await new Promise((resolve) => {
  const check = () => { if (pc.iceGatheringState === 'complete') resolve(); };
  pc.addEventListener('icegatheringstatechange', check);
  check();
});
const response = await fetch('/whip', {method: 'POST', headers: {'Content-Type': 'application/sdp'},
                                       body: pc.localDescription.sdp});
const body = await response.text();
whip.location = response.headers.get('Location');
if (response.status === 201) await pc.setRemoteDescription({type: 'answer', sdp: body});
return {status: response.status, location: whip.location, type: response.headers.get('Content-Type'),
        body: response.status === 201 ? '' : body};
"""


async def test_firefox_calls_through_whip(echo_server, firefox):
    await firefox.allow_microphone(echo_server.url)
    await firefox.navigate(echo_server.url + "/web/style.css")  # any page of the server's origin
    created = await firefox.run_async(WHIP_CALL)
    assert created["status"] == 201, created
    assert created["type"] == "application/sdp" and created["location"].startswith("/whip/")
    session = echo_server.service.sessions[created["location"].rsplit("/", 1)[1]]
    await firefox.wait_for("window.whip.pc.connectionState === 'connected'", HANG_GUARD_S)
    ready = await firefox.wait_for("window.whip.events.find((e) => e.type === 'ready')", HANG_GUARD_S)
    assert ready["session_id"] == session.session_id

    await assert_audio_both_ways(firefox, session, "window.whip.mic", "window.whip.remote", "window.whip.pc")

    status = await firefox.run_async("return (await fetch(window.whip.location, {method: 'DELETE'})).status")
    assert status == 200
    await asyncio.wait_for(session.ended.wait(), HANG_GUARD_S)
    assert (session.end_kind, session.end_reason) == ("hung_up", "hung up (WHIP DELETE)")
    bye = await firefox.wait_for("window.whip.events.find((e) => e.type === 'bye')", HANG_GUARD_S)
    assert bye["reason"] == "hung up (WHIP DELETE)"
    await firefox.run("window.whip.pc.close()")
    assert echo_server.engine.free_slots == 2 and not echo_server.service.sessions


async def test_firefox_closes_its_peer_connection_first(echo_server, firefox, caplog):
    """Firefox closes its peer connection and sends nothing else: the server notices from the media (the
    RTCP BYE, or DTLS closing) and frees the slot long before the media timeout, and logs no error."""
    session = await call_from_page(firefox, echo_server)
    await until(lambda: session.call.stats.frames_in >= 10, "Firefox's audio at the engine")
    await firefox.run("window.moshiCall.pc.close()")  # no DELETE
    await asyncio.wait_for(session.ended.wait(), HANG_GUARD_S)
    assert session.end_kind in {"caller_gone", "connection_closed"}, session.end_reason
    assert echo_server.engine.free_slots == 2 and not echo_server.service.sessions
    assert errors_logged(caplog) == []


async def test_the_server_ends_the_call_first(echo_server, firefox, caplog):
    """The server ends the call (as it does on shutdown): Firefox's page hears `bye` with the reason,
    says so and closes its peer connection; the server logs no error."""
    session = await call_from_page(firefox, echo_server)
    await until(lambda: session.call.stats.frames_in >= 10, "Firefox's audio at the engine")
    await echo_server.service.end_all_calls("the server is restarting", kind="shutdown")
    assert (session.end_kind, session.end_reason) == ("shutdown", "the server is restarting")
    await firefox.wait_for("document.getElementById('message').textContent.startsWith('Call ended')", HANG_GUARD_S)
    assert await firefox.run("return document.getElementById('message').textContent") == (
        "Call ended: the server is restarting.")
    assert await firefox.run("return window.moshiCall.pc.signalingState") == "closed"
    assert not await firefox.run("return document.getElementById('call').disabled")  # may call again
    assert echo_server.engine.free_slots == 2 and not echo_server.service.sessions
    assert errors_logged(caplog) == []
