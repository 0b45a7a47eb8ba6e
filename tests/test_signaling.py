"""The HTTP API under bad input, a full engine, a silent caller and hang-ups, with real aiortc peers."""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamTrack
from conftest import connect, start_server, stop_server
from test_call_e2e import dbfs, speechlike, tone

from server.caller import CallRefused, place_call
from server.engine.setup import create_engine
from server.model.source import ModelSource


async def make_offer(audio: bool = True, data: bool = True) -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection()
    if audio:
        pc.addTransceiver("audio", direction="sendrecv")
    if data:
        pc.createDataChannel("events")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


def without_opus(sdp: str) -> str:
    """The same offer with only PCMU/PCMA: Opus's payload type removed from m= and its a= lines."""
    opus = re.search(r"a=rtpmap:(\d+) opus/48000", sdp).group(1)
    lines = []
    for line in sdp.splitlines():
        if line.startswith("m=audio"):
            line = " ".join(part for part in line.split(" ") if part != opus)
        if re.match(rf"a=(rtpmap|fmtp|rtcp-fb):{opus}\b", line):
            continue
        lines.append(line)
    return "\r\n".join(lines) + "\r\n"


async def test_bad_offers_get_a_4xx_that_says_what_is_wrong_and_leave_nothing_behind(tiny_server):
    url = tiny_server.url
    pc_audio, good_sdp = await make_offer()
    pc_data, data_only_sdp = await make_offer(audio=False)
    cases = [
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        ({"data": good_sdp, "headers": {"Content-Type": "application/sdp"}}, 415, "application/json"),
        ({"json": ["offer"]}, 400, "JSON object"),
        ({"json": {"sdp": good_sdp, "type": "answer"}}, 400, '"type" must be "offer"'),
        ({"json": {"type": "offer"}}, 400, '"sdp" must be a non-empty string'),
        ({"json": {"sdp": "hello there", "type": "offer"}}, 400, "does not parse"),
        ({"json": {"sdp": "v=0\r\nm=audio x y\r\n", "type": "offer"}}, 400, "does not parse"),
        ({"json": {"sdp": data_only_sdp, "type": "offer"}}, 422, "no audio"),
        ({"json": {"sdp": without_opus(good_sdp), "type": "offer"}}, 422, "no Opus"),
        ({"json": {"sdp": good_sdp.replace("a=sendrecv", "a=recvonly"), "type": "offer"}}, 422,
         "the offer's audio does not send (recvonly)"),  # it would hold a slot and never be heard
        ({"json": {"sdp": good_sdp.replace("a=mid:0\r\n", ""), "type": "offer"}}, 400, "needs an a=mid line"),
        ({"data": b"x" * (200 * 1024), "headers": {"Content-Type": "application/json"}}, 413, "larger than"),
        # Parses and offers Opus, but aiortc cannot apply it: the slot taken for it must come back.
        ({"json": {"sdp": re.sub(r"a=ice-(ufrag|pwd):.*\r\n", "", good_sdp), "type": "offer"}}, 400,
         "could not be applied"),
    ]
    async with aiohttp.ClientSession() as http:
        for kwargs, status, message in cases:
            async with http.post(f"{url}/offer", **kwargs) as response:
                body = await response.json()
                assert response.status == status, (kwargs, body)
                assert message in body["error"], body
    await pc_audio.close()
    await pc_data.close()
    assert not tiny_server.service.sessions and tiny_server.engine.free_slots == 2
    assert len(tiny_server.service.ended) == 0  # a refused offer never was a call: nothing kept for it
    recording = await place_call(url, speechlike(1.5), tail_s=0.0)  # the server still answers calls
    assert dbfs(recording.audio[12000:]) > -40


async def test_a_full_engine_answers_503_with_retry_after_and_frees_at_once():
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1))
    first = asyncio.ensure_future(place_call(server.url, tone(300, 2.0), tail_s=0.0))
    while not server.service.sessions:
        await asyncio.sleep(0.01)
    with pytest.raises(CallRefused) as refused:
        await place_call(server.url, tone(300, 0.5))
    assert refused.value.status == 503 and refused.value.retry_after == "5"
    assert "busy" in refused.value.message
    await first
    second = await place_call(server.url, tone(300, 0.5), tail_s=0.2)
    assert second.session_id
    await stop_server(server)


async def test_alive_at_once_ready_when_warm_with_a_slot_free_and_the_page_is_served():
    server = await start_server(create_engine(ModelSource("tiny"), max_calls=1), start_engine=False)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/healthz") as response:
            assert response.status == 200 and (await response.json())["alive"] is True
        async with http.get(f"{server.url}/readyz") as response:
            assert response.status == 503 and "warming up" in (await response.json())["reason"]
        async with http.post(f"{server.url}/offer", json={"sdp": (await make_offer())[1], "type": "offer"}) as r:
            assert r.status == 503 and "not ready" in (await r.json())["error"]
        await server.engine.start()
        async with http.get(f"{server.url}/readyz") as response:
            assert response.status == 200 and (await response.json())["free_slots"] == 1
        call = await server.engine.open_call()  # the only slot taken: alive, but not ready for another call
        server.service.health._device_checked_at = 0.0
        async with http.get(f"{server.url}/readyz") as response:
            assert response.status == 503 and "all 1 call slots are busy" in (await response.json())["reason"]
        await call.close()
        async with http.get(f"{server.url}/healthz") as response:
            assert response.status == 200
        async with http.get(f"{server.url}/status") as response:
            status = await response.json()
            assert status["test_model"] is True and "babbles" in status["notice"] and status["free_slots"] == 1
        async with http.get(f"{server.url}/") as response:
            page = await response.text()
            assert response.status == 200 and "<script" in page and "app.js" in page
        async with http.get(f"{server.url}/web/app.js") as response:
            assert response.status == 200
    await stop_server(server)


async def test_a_caller_with_no_data_channel_still_gets_audio(echo_server):
    recording = await place_call(echo_server.url, tone(440, 1.5), events=False, tail_s=0.3)
    assert not recording.events
    assert dbfs(recording.audio) > -35


class NeverSends(MediaStreamTrack):
    """An audio track whose source never produces a frame."""

    kind = "audio"

    async def recv(self):
        await asyncio.Event().wait()


async def test_a_track_that_never_sends_ends_the_call_with_a_clear_error():
    from signaling.app import SignalingConfig

    server = await start_server(create_engine(ModelSource("echo"), max_calls=1),
                                SignalingConfig(media_timeout_s=1.0))
    pc = RTCPeerConnection()
    pc.addTrack(NeverSends())
    channel = pc.createDataChannel("events")
    messages: list[dict] = []
    bye = asyncio.Event()

    @channel.on("message")
    def on_message(message):
        messages.append(json.loads(message))
        if messages[-1]["type"] == "bye":
            bye.set()

    session = await connect(server, pc)
    await asyncio.wait_for(bye.wait(), 10)
    await asyncio.wait_for(session.ended.wait(), 2)
    assert [m["type"] for m in messages] == ["ready", "error", "bye"]
    assert "no audio from the caller for 1 s" in messages[1]["reason"]
    assert not server.service.sessions and server.engine.free_slots == 1
    await pc.close()
    await stop_server(server)


@pytest.mark.parametrize("how", ["delete", "close"])
async def test_after_a_hang_up_the_slot_is_freed_by_it_and_the_next_call_is_isolated(how):
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1))
    first = asyncio.ensure_future(place_call(server.url, tone(440, 1.5), tail_s=0.0, hang_up=how))
    while not server.service.sessions:
        await asyncio.sleep(0.01)
    session = next(iter(server.service.sessions.values()))
    await first
    await asyncio.wait_for(session.ended.wait(), 30)  # a guard against a hang, not a timing
    assert session.end_kind != "no_media"  # the hang-up (DELETE, or DTLS close) ended it, not the media timeout
    assert server.engine.free_slots == 1 and not server.service.sessions
    assert session.pc.connectionState == "closed" and session.outbound.readyState == "ended"

    second = await place_call(server.url, tone(880, 1.5), tail_s=0.3)
    reply = second.audio
    spectrum = np.abs(np.fft.rfft(reply))
    freqs = np.fft.rfftfreq(reply.size, 1 / 24000)
    energy_880 = spectrum[(freqs > 860) & (freqs < 900)].sum()
    energy_440 = spectrum[(freqs > 420) & (freqs < 460)].sum()
    assert energy_880 > 50 * energy_440  # nothing of the first caller's 440 Hz
    await stop_server(server)


async def test_pacing_over_a_five_second_call(tiny_server):
    call = asyncio.ensure_future(place_call(tiny_server.url, speechlike(5.5), tail_s=0.0))
    while not tiny_server.service.sessions:
        await asyncio.sleep(0.01)
    session = next(iter(tiny_server.service.sessions.values()))
    while session.outbound.clock_start is None:
        await asyncio.sleep(0.01)
    await asyncio.sleep(5.0)  # the measured interval, not a synchronisation
    elapsed = time.monotonic() - session.outbound.clock_start
    sent = session.outbound.frames_sent
    assert sent <= elapsed / 0.020 + 2, (sent, elapsed)  # never ahead of the clock (a busy machine may lag)
    assert sent >= 100  # and it did send, for the 5 s measured
    await call
    # Not asserted: that nothing was shed. On a busy machine the model or the loop falls behind and the
    # outbound track sheds standing delay, as designed (a CI run shed 20 ms); tests/test_audio_out.py shows
    # that a producer that keeps up loses nothing, and tests/test_bounded_delay.py the shedding in a call.
