"""Attack clients shared by the tests and bench/abuse.py: real aiortc peers that behave badly on purpose.

Each one is what a stranger on the internet can do with an ordinary WebRTC stack: an offer nobody follows
up, a track that sends a packet now and then or far faster than real time, SCTP DATA chunks of its own
making (aiortc's private transport parts: fair game for an attacker, never for the server).
"""

from __future__ import annotations

import asyncio
import fractions

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection
from aiortc.rtcsctptransport import WEBRTC_BINARY, DataChunk, tsn_plus_one


async def aiortc_offer() -> str:
    """A complete offer from a real aiortc peer: audio both ways and the `events` data channel."""
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.createDataChannel("events")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


class SparseTrack(MediaStreamTrack):
    """One 20 ms Opus packet every `every_s`, RTP time running on: a line held with almost no traffic (or, at
    0.4 s, a caller in silence with Opus DTX)."""

    kind = "audio"

    def __init__(self, every_s: float):
        super().__init__()
        self.every_s = every_s
        self.sent = 0
        self._pts = 0
        self._sent_changed = asyncio.Condition()

    async def recv(self) -> av.AudioFrame:
        if self.sent:
            await asyncio.sleep(self.every_s)  # the behaviour itself: a packet now and then
        frame = av.AudioFrame.from_ndarray(np.full((1, 1920), 300, np.int16), format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = 48000, self._pts, fractions.Fraction(1, 48000)
        self._pts += round(self.every_s * 48000)
        self.sent += 1
        async with self._sent_changed:
            self._sent_changed.notify_all()
        return frame

    async def wait_sent(self, count: int) -> None:
        async with self._sent_changed:
            await self._sent_changed.wait_for(lambda: self.sent >= count)


class UnpacedTone(MediaStreamTrack):
    """A 20 ms frame of a tone each time aiortc asks, after only `gap_s`: a sender ahead of its own timestamps."""

    kind = "audio"

    def __init__(self, gap_s: float):
        super().__init__()
        self.gap_s = gap_s
        self.pts = 0

    async def recv(self) -> av.AudioFrame:
        await asyncio.sleep(self.gap_s)
        t = (self.pts + np.arange(960)) / 48000
        samples = (0.1 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(np.repeat(samples, 2, axis=1), format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = 48000, self.pts, fractions.Fraction(1, 48000)
        self.pts += 960
        return frame


class ChunkCrafter:
    """Queues SCTP DATA chunks of our own making on a connected aiortc peer's transport, as its `_send` would
    (they then go out, and are retransmitted, under aiortc's congestion control): `await sctp._transmit()`."""

    def __init__(self, pc: RTCPeerConnection, stream_id: int):
        self.sctp = pc.sctp
        self.stream_id = stream_id

    def queue(self, flags: int, data: bytes, stream_seq: int, pp_id: int = WEBRTC_BINARY,
              stream_id: int | None = None) -> None:
        sctp = self.sctp
        chunk = DataChunk(flags=flags)
        chunk.tsn, chunk.stream_seq, chunk.protocol, chunk.user_data = sctp._local_tsn, stream_seq, pp_id, data
        chunk.stream_id = self.stream_id if stream_id is None else stream_id
        chunk._abandoned = chunk._acked = chunk._in_flight = chunk._retransmit = False
        chunk._book_size, chunk._expiry, chunk._max_retransmits = len(data), None, None
        chunk._misses = chunk._sent_count = 0
        chunk._sent_time = None
        sctp._local_tsn = tsn_plus_one(sctp._local_tsn)
        sctp._outbound_queue.append(chunk)

    def next_stream_seq(self) -> int:
        return self.sctp._outbound_stream_seq.get(self.stream_id, 0)
