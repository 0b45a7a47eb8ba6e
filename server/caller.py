"""A headless caller: places a real WebRTC call to the server, as a browser would.

It offers an Opus audio track and the `events` data channel, POSTs the offer
to `/offer`, streams audio in real time through a paced track, and records
what comes back: the reply audio (with arrival times), the transcript and the
status messages. Used by `moshi-webrtc call`, the end-to-end tests and the
latency benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp
import numpy as np
from aiortc import RTCCertificate, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .audio.inbound import InboundAudio
from .media import aiortc_compat
from .media.audio_out import OutboundAudioTrack
from .media.ice import IceConfig, IceServer

SEND_RATE = 48000
RECORD_RATE = 24000


class CallFailed(RuntimeError):
    """The call was answered but media could not flow (ICE or TURN)."""


class SdpRewrite(Protocol):
    def offer(self, sdp: str) -> str: ...
    def answer(self, sdp: str) -> str: ...


class CallRefused(RuntimeError):
    def __init__(self, status: int, message: str, retry_after: str | None = None, session_id: str | None = None):
        """`session_id`: a call made and ended at once (502, no relay): GET /sessions/{id} says why."""
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.retry_after = status, message, retry_after
        self.session_id = session_id


@dataclass
class CallRecording:
    session_id: str = ""
    offer_ms: float = 0.0  # POST /offer round trip, ICE gathering on both sides included
    connect_ms: float = 0.0  # from creating the offer to ICE+DTLS connected
    first_audio_ms: float | None = None  # from connected to the first non-silent reply frame
    answered_at: float | None = None  # monotonic time the answer came back
    chunks: list[np.ndarray] = field(default_factory=list)  # reply audio, float32 mono 24 kHz
    arrivals: list[float] = field(default_factory=list)  # monotonic time each chunk came in
    texts: list[str] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    end_reason: str | None = None

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)

    @property
    def first_voiced_at(self) -> float | None:
        """Arrival time of the first reply chunk that is not silence."""
        voiced = [t for t, c in zip(self.arrivals, self.chunks, strict=True) if c.size and np.abs(c).max() > 1e-3]
        return voiced[0] if voiced else None

    @property
    def transcript(self) -> str:
        return "".join(self.texts)

    def summary(self) -> dict:
        audio = self.audio
        return {
            "session_id": self.session_id,
            "offer_ms": round(self.offer_ms, 1),
            "connect_ms": round(self.connect_ms, 1),
            "first_audio_ms": None if self.first_audio_ms is None else round(self.first_audio_ms, 1),
            "answer_to_first_audio_ms": (
                None if self.first_voiced_at is None or self.answered_at is None
                else round(1000 * (self.first_voiced_at - self.answered_at), 1)
            ),
            "reply_seconds": round(len(audio) / RECORD_RATE, 3),
            "reply_rms": round(float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))), 5) if audio.size else 0.0,
            "text_messages": len(self.texts),
            "events": [e.get("type") for e in self.events],
            "end_reason": self.end_reason,
        }


def write_wav(path: str | Path, samples: np.ndarray, rate: int = RECORD_RATE) -> None:
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())


async def place_call(
    url: str,
    audio: np.ndarray,
    *,
    rate: int = SEND_RATE,
    tail_s: float = 1.0,
    events: bool = True,
    ice: IceConfig | None = None,
    relay_only: bool = False,
    hang_up: str = "delete",
    silence_after: bool = True,
    http: aiohttp.ClientSession | None = None,
    persona: dict | None = None,
    token: str | None = None,
    sdp: SdpRewrite | None = None,
    fec_loss_percent: int | None = None,
    certificate: RTCCertificate | None = None,
) -> CallRecording:
    """Call `url` (the server's base URL), stream `audio` in real time, record the reply.

    `ice`: the caller's ICE servers; None asks the server (GET /ice-servers), as the page does.
    `relay_only`: gather relay candidates only (iceTransportPolicy "relay").
    `hang_up`: "delete" ends with DELETE /sessions/{id}, "close" just closes the peer
    connection, as a caller who vanishes would. `silence_after`: keep sending silence
    once the audio is out (as an open microphone does), or stop sending.
    `persona`: {"prompt": ..., "voice": ...} for a model that takes one.
    `token`: the server's API token, sent as `Authorization: Bearer`.
    `sdp`: rewrites the offer before it is sent and the answer before it is applied (an impairment
    relay routes the media through itself this way). `fec_loss_percent`: send with our libopus encoder and
    in-band FEC for this expected loss, as a browser does once it sees loss (aiortc's encoder sends none).
    `certificate`: the caller's DTLS certificate (default: aiortc's own, ECDSA), e.g. an RSA one.
    """
    if http is None:
        async with aiohttp.ClientSession() as own_http:
            return await place_call(url, audio, rate=rate, tail_s=tail_s, events=events, ice=ice,
                                    relay_only=relay_only, hang_up=hang_up, silence_after=silence_after,
                                    http=own_http, persona=persona, token=token, sdp=sdp,
                                    fec_loss_percent=fec_loss_percent, certificate=certificate)
    recording = CallRecording()
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    if ice is None:
        async with http.get(f"{url}/ice-servers", headers=auth) as response:
            servers = (await response.json())["iceServers"] if response.status == 200 else []
        ice = IceConfig(tuple(IceServer.from_json(server) for server in servers))
    ice = dataclasses.replace(ice, relay_only=relay_only)
    aiortc_compat.allow_rsa_dtls_peers()  # an answer may make us the DTLS client of a server with an RSA certificate
    pc = RTCPeerConnection(ice.rtc_configuration("caller"))
    if certificate is not None:
        aiortc_compat.use_certificate(pc, certificate)
    voice = OutboundAudioTrack(sample_rate=rate, max_buffer_ms=int(1000 * (len(audio) / rate + 60)),
                               end_when_drained=not silence_after)
    voice.push(audio)
    sender = pc.addTrack(voice)
    if fec_loss_percent is not None:
        aiortc_compat.use_opus_encoder(sender, aiortc_compat.OpusSenderEncoder(fec_loss_percent))
    connected = asyncio.Event()
    failed = asyncio.Event()
    reader: asyncio.Task | None = None

    if events:
        channel = pc.createDataChannel("events")

        @channel.on("message")
        def on_message(message: str) -> None:
            event = json.loads(message)
            recording.events.append(event)
            if event.get("type") == "text":
                recording.texts.append(event["text"])
            elif event.get("type") in ("bye", "error") and recording.end_reason is None:
                recording.end_reason = event.get("reason")

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState == "connected":
            connected.set()
        elif pc.connectionState == "failed":
            failed.set()

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        nonlocal reader
        if track.kind == "audio":
            reader = asyncio.ensure_future(record_track(track, recording.chunks, recording.arrivals))

    started = time.monotonic()
    try:
        await pc.setLocalDescription(await pc.createOffer())
        if relay_only and " typ relay" not in pc.localDescription.sdp:
            raise CallFailed("no TURN relay candidate: the TURN server is unreachable or refused the credentials")
        posted = time.monotonic()
        offer = {"sdp": pc.localDescription.sdp if sdp is None else sdp.offer(pc.localDescription.sdp),
                 "type": "offer"}
        if persona is not None:
            offer["persona"] = persona
        async with http.post(f"{url}/offer", json=offer, headers=auth) as response:
            body = await response.json()
            if response.status != 200:
                raise CallRefused(response.status, body.get("error", ""), response.headers.get("Retry-After"),
                                  body.get("session_id"))
        recording.offer_ms = 1000 * (time.monotonic() - posted)
        recording.session_id = body["session_id"]
        recording.answered_at = time.monotonic()
        answer = body["sdp"] if sdp is None else sdp.answer(body["sdp"])
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type=body["type"]))
        await _first_of(connected, failed, timeout=10)
        if not connected.is_set():
            raise CallFailed(f"ICE did not connect ({pc.connectionState}): no candidate pair worked")
        recording.connect_ms = 1000 * (time.monotonic() - started)
        connected_at = time.monotonic()
        await asyncio.sleep(len(audio) / rate + tail_s)  # the call lasts as long as the audio, plus a tail
        if hang_up == "delete":
            async with http.delete(f"{url}/sessions/{recording.session_id}", headers=auth) as response:
                await response.read()
        if recording.first_voiced_at is not None:
            recording.first_audio_ms = 1000 * (recording.first_voiced_at - connected_at)
    finally:
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        await pc.close()
    return recording


async def _first_of(*events: asyncio.Event, timeout: float) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def record_track(track: MediaStreamTrack, chunks: list[np.ndarray], arrivals: list[float]) -> None:
    """Append a track's audio as 20 ms float32 mono 24 kHz chunks, with the time each came in, until it ends."""
    inbound = InboundAudio(sample_rate=RECORD_RATE, frame_size=RECORD_RATE // 50)
    with contextlib.suppress(MediaStreamError):
        while True:
            frame = await track.recv()
            now = time.monotonic()
            for chunk in inbound.push(frame):
                chunks.append(chunk)
                arrivals.append(now)
