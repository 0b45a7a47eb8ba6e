"""WHIP (RFC 9725) with an aiortc client speaking it: create, trickle, delete, auth (ICE restarts:
test_handover)."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from conftest import start_server, stop_server
from test_call_e2e import dbfs, tone

from server.engine.setup import create_engine
from server.media.audio_out import OutboundAudioTrack
from server.media.ice import IceConfig, IceServer
from server.model.source import ModelSource
from signaling.app import SignalingConfig

SDP = "application/sdp"
SDPFRAG = "application/trickle-ice-sdpfrag"


class WhipClient:
    """Just enough of a WHIP client: an offer with audio and the events channel."""

    def __init__(self, base: str, token: str | None = None):
        self.base, self.token = base, token
        self.pc = RTCPeerConnection()
        self.voice = OutboundAudioTrack(sample_rate=48000, max_buffer_ms=30_000)
        self.pc.addTrack(self.voice)
        self.events: list[dict] = []
        self.chunks: list[np.ndarray] = []
        channel = self.pc.createDataChannel("events")
        channel.on("message", lambda m: self.events.append(json.loads(m)))
        self.connected = asyncio.Event()
        self.pc.on("connectionstatechange", self._state)
        self.pc.on("track", self._track)
        self.location: str | None = None

    def _state(self):
        if self.pc.connectionState == "connected":
            self.connected.set()

    def _track(self, track):
        async def read():
            while True:
                frame = await track.recv()
                samples = frame.to_ndarray().astype(np.float32).reshape(-1, 2).mean(axis=1) / 32768
                self.chunks.append(samples)

        asyncio.ensure_future(read())

    def headers(self, content_type: str | None = None) -> dict:
        headers = {"Content-Type": content_type} if content_type else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    async def offer_sdp(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp


async def test_whip_call_with_trickled_candidates_and_the_text_channel():
    ice = IceConfig((IceServer(("stun:127.0.0.1:3478",)),))
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1), SignalingConfig(ice=ice))
    client = WhipClient(server.url)
    client.voice.push(tone(440, 3.0))
    full = await client.offer_sdp()
    candidates = re.findall(r"^a=candidate:.*$", full, re.MULTILINE)
    assert candidates
    bare = re.sub(r"^a=(candidate:.*|end-of-candidates)\r\n", "", full, flags=re.MULTILINE)  # trickle them later
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/whip", data=bare, headers=client.headers(SDP)) as response:
            assert response.status == 201, await response.text()
            assert response.content_type == SDP
            location = response.headers["Location"]
            assert re.fullmatch(r"/whip/[\w-]+", location)
            assert '<stun:127.0.0.1:3478>; rel="ice-server"' in response.headers.getall("Link")
            answer = await response.text()
        await client.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        ufrag, pwd = re.search(r"a=ice-ufrag:(\S+)", full).group(1), re.search(r"a=ice-pwd:(\S+)", full).group(1)
        mid = re.search(r"^a=mid:(\S+)", full, re.MULTILINE).group(1)
        fragment = f"a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\na=mid:{mid}\r\n" + "\r\n".join(candidates) + "\r\n"
        session = next(iter(server.service.sessions.values()))
        server_ice = session.pc.getTransceivers()[0].receiver.transport.transport
        assert server_ice.getRemoteCandidates() == []  # the offer carried none
        async with http.patch(f"{server.url}{location}", data=fragment, headers=client.headers(SDPFRAG)) as response:
            assert response.status == 204
        remote = server_ice.getRemoteCandidates()
        assert sorted(c.port for c in remote) == sorted(int(line.split()[5]) for line in candidates)
        await asyncio.wait_for(client.connected.wait(), 10)

        restart = f"a=ice-ufrag:zzzz\r\na=ice-pwd:{'y' * 22}\r\na=mid:nope\r\n"  # a section nobody offered
        async with http.patch(f"{server.url}{location}", data=restart, headers=client.headers(SDPFRAG)) as response:
            assert response.status == 422 and "media sections" in (await response.json())["error"]
        async with http.patch(f"{server.url}{location}", data=fragment, headers=client.headers(SDP)) as response:
            assert response.status == 415
        async with http.patch(f"{server.url}/whip/nope", data=fragment, headers=client.headers(SDPFRAG)) as response:
            assert response.status == 404

        await asyncio.sleep(3.0)  # the tone plays out and comes back: the measured window
        async with http.delete(f"{server.url}{location}", headers=client.headers()) as response:
            assert response.status == 200
        assert session.ended.is_set() and server.engine.free_slots == 1
        async with http.delete(f"{server.url}{location}", headers=client.headers()) as response:
            assert response.status == 404
    reply = np.concatenate(client.chunks)
    assert dbfs(reply[np.abs(reply) > 0.02]) == pytest.approx(-20, abs=3)
    assert client.events[0]["type"] == "ready"
    await client.pc.close()
    await stop_server(server)


async def test_whip_refuses_the_wrong_content_type_and_a_missing_or_wrong_token():
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1), SignalingConfig(api_token="t0ken"))
    client = WhipClient(server.url)
    sdp = await client.offer_sdp()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/whip", data=sdp, headers={"Content-Type": SDP}) as response:
            assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
        bad = {"Content-Type": SDP, "Authorization": "Bearer nope"}
        async with http.post(f"{server.url}/whip", data=sdp, headers=bad) as response:
            assert response.status == 401
        good = {"Authorization": "Bearer t0ken"}
        async with http.post(f"{server.url}/whip", json={"sdp": sdp}, headers=good) as response:
            assert response.status == 415 and "application/sdp" in (await response.json())["error"]
        async with http.post(f"{server.url}/whip", data="v=0\r\n", headers={**good, "Content-Type": SDP}) as response:
            assert response.status == 422  # parses, but offers no audio
        async with http.post(f"{server.url}/whip", data=sdp, headers={**good, "Content-Type": SDP}) as response:
            assert response.status == 201
            location = response.headers["Location"]
        async with http.delete(f"{server.url}{location}") as response:
            assert response.status == 401  # the token guards hang-up too
        async with http.delete(f"{server.url}{location}", headers=good) as response:
            assert response.status == 200
    assert server.engine.free_slots == 1
    await client.pc.close()
    await stop_server(server)


@pytest.mark.parametrize("media_workers", [0, 1])
async def test_options_is_the_same_in_every_mode_and_ice_servers_come_only_with_the_answer(media_workers):
    """OPTIONS /whip answers 204 with Accept-Post and no ICE servers, with media in workers (the default: the
    front answers it) or in the front's own process; TURN credentials leave only with the 201 answer (RFC
    9725), never in an OPTIONS answer, a CORS preflight from the server's own origin included."""
    from test_media_workers import start_front, stop_front

    ice = IceConfig((IceServer(("stun:127.0.0.1:3478",)),), turn_urls=("turn:127.0.0.1:3479?transport=udp",),
                    turn_secret="s3cret")
    front = await start_front(1, media_workers, SignalingConfig(ice=ice, media_timeout_s=5.0))
    url = front.url
    client = WhipClient(url)
    try:
        async with aiohttp.ClientSession() as http:
            preflight = {"Origin": url, "Access-Control-Request-Method": "POST"}
            for headers in ({}, preflight):
                async with http.options(f"{url}/whip", headers=headers) as response:
                    assert response.status == 204 and response.headers["Accept-Post"] == SDP, headers
                    assert "Link" not in response.headers and "credential" not in str(response.headers), headers
            async with http.post(f"{url}/whip", data=await client.offer_sdp(), headers=client.headers(SDP)) as r:
                assert r.status == 201, await r.text()
                links = r.headers.getall("Link")
            assert '<stun:127.0.0.1:3478>; rel="ice-server"' in links
            (turn,) = [link for link in links if link.startswith("<turn:")]
            assert 'username="' in turn and 'credential="' in turn
            async with http.delete(url + r.headers["Location"]) as response:
                assert response.status == 200
    finally:
        await client.pc.close()
        await stop_front(front)
