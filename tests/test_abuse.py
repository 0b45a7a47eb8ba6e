"""Strangers on the internet: offers and trickle built to cost the server, from other loopback addresses.

Each attack is a real client (aiohttp from 127.0.0.2, an aiortc offer rewritten by hand) and each test
asserts what the legitimate caller, from 127.0.0.1, gets afterwards or meanwhile: a call with its audio.
"""

from __future__ import annotations

import asyncio
import logging
import re

import aiohttp
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from attackers import aiortc_offer
from conftest import start_server, stop_server
from test_whip import SDP, SDPFRAG, WhipClient

from server.caller import place_call
from server.engine.setup import create_engine
from server.media.ice import IceConfig
from server.model.source import ModelSource
from signaling.app import SignalingConfig
from signaling.connections import ConnectionLimits
from signaling.metrics import RefusalLog
from signaling.offer_check import MAX_OFFER_CANDIDATES
from signaling.whip import MAX_PATCH_CANDIDATES, MAX_PATCHES_PER_CALL

STRANGER = "127.0.0.2"


def from_address(address: str) -> aiohttp.ClientSession:
    """HTTP from another loopback address: the server sees another client."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


@pytest.fixture
async def server():
    running = await start_server(create_engine(ModelSource("echo"), max_calls=1),
                                 SignalingConfig(media_timeout_s=5.0, connect_timeout_s=1.0, max_offers_per_minute=0))
    yield running
    await stop_server(running)


async def assert_a_caller_gets_through(server) -> None:
    recording = await place_call(server.url, np.zeros(48000, np.float32) + 0.05, tail_s=0.3)
    assert recording.end_reason in (None, "hung up") and len(recording.audio) > 0


def many_audio_sections(sdp: str, count: int) -> str:
    """`count` minimal audio sections more (400: about 30 KB, under the body limit)."""
    return sdp + "".join(f"m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:x{i}\r\na=rtpmap:111 opus/48000/2\r\n"
                         for i in range(count))


def many_candidates(sdp: str, count: int) -> str:
    lines = "".join(f"a=candidate:{i} 1 udp 2130706431 127.0.0.2 {10000 + i} typ host\r\n" for i in range(count))
    return sdp.replace("a=end-of-candidates\r\n", lines + "a=end-of-candidates\r\n", 1)


@pytest.mark.parametrize("attack, expected", [
    (lambda sdp: many_audio_sections(sdp, 400), "401 audio sections"),
    (lambda sdp: many_candidates(sdp, 800), f"at most {MAX_OFFER_CANDIDATES} are taken"),
    (lambda sdp: re.sub(r"^a=fingerprint:.*\r\n", "", sdp, flags=re.MULTILINE), "no DTLS fingerprint"),
    (lambda sdp: sdp.replace("m=application", "m=text"), "has a text section"),
])
async def test_an_offer_built_to_cost_the_server_gets_a_400_before_any_peer_is_made(server, attack, expected):
    sdp = attack(await aiortc_offer())
    async with from_address(STRANGER) as http:
        async with http.post(f"{server.url}/offer", json={"sdp": sdp, "type": "offer"}) as response:
            assert response.status == 400 and expected in (await response.json())["error"]
        async with http.post(f"{server.url}/whip", data=sdp, headers={"Content-Type": SDP}) as response:
            assert response.status == 400 and expected in (await response.json())["error"]
    assert not server.service.sessions and server.engine.free_slots == 1
    await assert_a_caller_gets_through(server)


async def test_deeply_nested_json_is_a_400_not_a_500(server):
    async with from_address(STRANGER) as http:
        for nested in (b"[" * 30_000 + b"]" * 30_000, b'{"sdp": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"):
            async with http.post(f"{server.url}/offer", data=nested,
                                 headers={"Content-Type": "application/json"}) as response:
                assert response.status == 400 and "nested too deeply" in (await response.json())["error"]


async def test_an_answered_call_that_never_connects_gives_its_slot_back_in_seconds(server):
    """A stranger takes the only slot with a valid offer and never connects: the slot is free again at the
    connect timeout (1 s here; the media timeout is 5 s), and the call ends saying why."""
    offer = {"sdp": await aiortc_offer(), "type": "offer"}
    async with from_address(STRANGER) as http, http.post(f"{server.url}/offer", json=offer) as response:
        assert response.status == 200
        session = server.service.sessions[(await response.json())["session_id"]]
    assert server.engine.free_slots == 0
    await session.ended.wait()
    assert session.end_kind == "ice_failed" and "1 s after the answer" in session.end_reason
    assert server.engine.free_slots == 1
    await assert_a_caller_gets_through(server)


async def test_trickle_that_is_malformed_or_endless_gets_4xx_and_the_call_goes_on(server):
    client = WhipClient(server.url)
    client.voice.push(np.zeros(48000 * 20, np.float32) + 0.05)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/whip", data=await client.offer_sdp(), headers=client.headers(SDP)) as r:
            assert r.status == 201
            location = r.headers["Location"]
        session = next(iter(server.service.sessions.values()))
        mid = re.search(r"^a=mid:(\S+)", session.remote_sdp, re.MULTILINE).group(1)
        good = "1 1 udp 2130706431 127.0.0.1 40000 typ host"
        bad = {
            f"a=mid:{mid}\r\na=candidate:foo bar baz\r\n": "does not parse",
            f"a=candidate:{good}\r\n": "must follow an a=mid line",
            f"a=mid:{mid}\r\na=candidate:1 1 udp 2130706431 999.1.1.1 40000 typ host\r\n": "not an IP address",
            f"a=mid:{mid}\r\na=candidate:1 1 udp 2130706431 127.0.0.1 70000 typ host\r\n": "not an IP address",
            f"a=mid:{mid}\r\n" + f"a=candidate:{good}\r\n" * (MAX_PATCH_CANDIDATES + 1): "candidates a PATCH",
        }
        async with from_address(STRANGER) as stranger:
            for fragment, expected in bad.items():
                async with stranger.patch(server.url + location, data=fragment,
                                          headers={"Content-Type": SDPFRAG}) as response:
                    assert response.status == 400 and expected in (await response.json())["error"], fragment
            statuses = []
            for _ in range(MAX_PATCHES_PER_CALL):
                async with stranger.patch(server.url + location, data=f"a=mid:{mid}\r\n",
                                          headers={"Content-Type": SDPFRAG}) as response:
                    statuses.append(response.status)
        assert statuses[: MAX_PATCHES_PER_CALL - len(bad)] == [204] * (MAX_PATCHES_PER_CALL - len(bad))
        assert set(statuses[MAX_PATCHES_PER_CALL - len(bad):]) == {429}
        assert session.trickled_candidates == 0 and not session.ended.is_set()
        async with http.get(f"{server.url}/metrics") as response:
            metrics = await response.text()
    assert 'moshi_calls_rejected_total{reason="bad_trickle"} 5.0' in metrics
    assert 'moshi_calls_rejected_total{reason="trickle_limit"}' in metrics
    await client.pc.close()


async def test_ice_servers_mint_credentials_only_with_the_token_and_at_a_bounded_rate():
    ice = IceConfig(turn_urls=("turn:127.0.0.1:3479?transport=udp",), turn_secret="s3cret")
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1),
                                SignalingConfig(ice=ice, api_token="t0ken", max_ice_server_requests_per_minute=5))
    try:
        async with from_address(STRANGER) as stranger:
            async with stranger.get(f"{server.url}/ice-servers") as response:
                assert response.status == 401 and "credential" not in await response.text()
            token = {"Authorization": "Bearer t0ken"}
            statuses = []
            for _ in range(7):
                async with stranger.get(f"{server.url}/ice-servers", headers=token) as response:
                    statuses.append(response.status)
                    body = await response.text()
            assert statuses == [200] * 5 + [429] * 2 and "credential" not in body
        async with aiohttp.ClientSession() as http:  # another client still gets its servers
            async with http.get(f"{server.url}/ice-servers", headers=token) as response:
                assert response.status == 200 and "credential" in await response.text()
            async with http.get(f"{server.url}/metrics") as response:
                assert 'moshi_calls_rejected_total{reason="credentials_rate"} 2.0' in await response.text()
    finally:
        await stop_server(server)


async def test_offered_video_is_declined_and_the_call_goes_on(server):
    """A WHIP encoder (OBS, say) offers video beside audio: the answer declines it (a=inactive), so nothing
    is received or decoded for it (an unread track's queue grows), and the audio call works."""
    from aiortc import RTCSessionDescription

    from server.media.audio_out import OutboundAudioTrack

    pc = RTCPeerConnection()
    voice = OutboundAudioTrack(sample_rate=48000, max_buffer_ms=5000)
    voice.push(np.zeros(48000 * 3, np.float32) + 0.05)
    pc.addTrack(voice)
    pc.addTransceiver("video", direction="sendrecv")
    try:
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            offer = {"sdp": pc.localDescription.sdp, "type": "offer"}
            async with http.post(f"{server.url}/offer", json=offer) as response:
                assert response.status == 200
                answer = await response.json()
        assert re.search(r"^m=video .*?^a=inactive", answer["sdp"], re.MULTILINE | re.DOTALL)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        session = server.service.sessions[answer["session_id"]]
        while session.call.stats.frames_in < 5 and not session.ended.is_set():
            await asyncio.sleep(0.05)
        assert session.call.stats.frames_in >= 5 and not session.ended.is_set()
    finally:
        await pc.close()


async def read_to_close(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


async def test_half_open_connections_are_capped_and_timed_out_and_a_caller_gets_through():
    """A stranger opens 100 HTTP connections and sends half a request head on each (slowloris): past its cap
    they are closed at once, the rest at the head deadline; a caller gets through meanwhile; /metrics counts
    both reasons; nothing is left open."""
    limits = ConnectionLimits(max_per_address=8, head_timeout_s=1.0)
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1),
                                SignalingConfig(media_timeout_s=5.0, connections=limits))
    port = int(server.url.rsplit(":", 1)[1])
    try:
        streams = [await asyncio.open_connection("127.0.0.1", port, local_addr=(STRANGER, 0)) for _ in range(100)]
        for _, writer in streams:
            writer.write(b"POST /offer HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        await assert_a_caller_gets_through(server)
        closed = await asyncio.wait_for(asyncio.gather(*(read_to_close(reader) for reader, _ in streams)), 60)
        assert closed == [b""] * 100  # every one closed by the server (an abort: a reset), none answered
        guard = server.service.connections
        # the stranger's 8 within its cap, and the caller's idle keep-alive connections, once done
        assert guard.refused["connections_per_client"] == 92 and guard.refused["head_timeout"] >= 8
        async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as response:
            metrics = await response.text()
        assert 'moshi_http_connections_refused_total{reason="connections_per_client"} 92.0' in metrics
        assert re.search(r'^moshi_http_connections_refused_total\{reason="head_timeout"\} (8|9|\d\d)', metrics, re.M)
        assert guard.open_by_address().get(STRANGER) is None
    finally:
        for _, writer in streams:
            writer.close()
        await stop_server(server)


def test_refusals_are_logged_once_a_minute_per_client_and_reason(caplog):
    """A flood of refusals makes one log line a client and reason a minute, which says how many it stood for."""
    now = [0.0]
    refusals = RefusalLog(clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="signaling.metrics"):
        for _ in range(50):
            refusals.note(STRANGER, "rate_limited", "more than 20 offers a minute")
        refusals.note(STRANGER, "bad_offer", "no DTLS fingerprint")
        refusals.note("127.0.0.3", "rate_limited", "more than 20 offers a minute")
        now[0] = 61.0
        refusals.note(STRANGER, "rate_limited", "more than 20 offers a minute")
    assert [r.getMessage() for r in caplog.records] == [
        f"refused {STRANGER} (rate_limited): more than 20 offers a minute",
        f"refused {STRANGER} (bad_offer): no DTLS fingerprint",
        "refused 127.0.0.3 (rate_limited): more than 20 offers a minute",
        f"refused {STRANGER} (rate_limited): more than 20 offers a minute (49 more since)",
    ]
