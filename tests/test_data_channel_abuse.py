"""A caller abusing the data channel: real aiortc peers on loopback, the attacker crafting SCTP DATA chunks with
its own transport (aiortc privates are fair game here); the server side is guarded as the server guards it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from types import SimpleNamespace

import pytest
from aiortc import (
    RTCCertificate,
    RTCDataChannel,
    RTCDtlsTransport,
    RTCIceGatherer,
    RTCIceTransport,
    RTCPeerConnection,
    RTCSctpTransport,
    RTCSessionDescription,
)
from aiortc.rtcsctptransport import (
    SCTP_DATA_FIRST_FRAG,
    SCTP_DATA_LAST_FRAG,
    SCTP_DATA_UNORDERED,
    USERDATA_MAX_LENGTH,
    WEBRTC_BINARY,
    WEBRTC_STRING,
    DataChunk,
    tsn_minus_one,
)
from attackers import ChunkCrafter

from server.media.aiortc_compat import AiortcChanged
from server.media.sctp_compat import (
    MAX_HELD_CHUNKS,
    MAX_MESSAGE_BYTES,
    SLACK_BYTES,
    DataChannelGuard,
    guard_data_channels,
    with_max_message_size,
)

MIDDLE = 0  # neither the first nor the last fragment of a message


class Peers:
    """A client and a guarded server-side peer connection, connected, with the `events` channel open."""

    def __init__(self, client: RTCPeerConnection, server: RTCPeerConnection):
        self.client, self.server = client, server
        self.reasons: list[str] = []
        self.abused = asyncio.Event()
        self.guard: DataChannelGuard | None = None
        self.channel: RTCDataChannel | None = None
        self.server_channel: RTCDataChannel | None = None

    def on_abuse(self, reason: str) -> None:
        self.reasons.append(reason)
        self.abused.set()

    def held_bytes(self) -> int:
        """What aiortc holds in reassembly on the server, right now."""
        streams = self.server.sctp._inbound_streams.values()
        return sum(len(chunk.user_data) for stream in streams for chunk in stream.reassembly)

    def queue_chunk(self, flags: int, data: bytes, stream_seq: int, pp_id: int = WEBRTC_BINARY,
                    stream_id: int | None = None) -> None:
        """Queue a DATA chunk of our own making on the client's transport; `_transmit()` sends it."""
        ChunkCrafter(self.client, self.channel.id).queue(flags, data, stream_seq, pp_id, stream_id)

    def next_stream_seq(self) -> int:
        return ChunkCrafter(self.client, self.channel.id).next_stream_seq()


@contextlib.asynccontextmanager
async def connected(**limits):
    peers = Peers(RTCPeerConnection(), RTCPeerConnection())
    try:
        peers.channel = peers.client.createDataChannel("events")
        opened = asyncio.Event()
        peers.channel.on("open", opened.set)
        server_channel: asyncio.Future[RTCDataChannel] = asyncio.get_running_loop().create_future()
        peers.server.on("datachannel", server_channel.set_result)
        await peers.client.setLocalDescription(await peers.client.createOffer())
        await peers.server.setRemoteDescription(peers.client.localDescription)
        peers.guard = guard_data_channels(peers.server, peers.on_abuse, **limits)
        await peers.server.setLocalDescription(await peers.server.createAnswer())
        answer = peers.server.localDescription
        await peers.client.setRemoteDescription(RTCSessionDescription(with_max_message_size(answer.sdp), "answer"))
        async with asyncio.timeout(30):
            await opened.wait()
            peers.server_channel = await server_channel
        yield peers
    finally:
        await peers.client.close()
        await peers.server.close()


async def test_a_message_that_never_ends_trips_the_guard_at_the_bound_and_nothing_stays_held():
    async with connected() as peers:
        seq = peers.next_stream_seq()
        fragment = b"x" * USERDATA_MAX_LENGTH
        peers.queue_chunk(SCTP_DATA_FIRST_FRAG, fragment, seq)
        for _ in range(199):  # 230 KB: under the rate bucket's burst, so only the held bytes can trip
            peers.queue_chunk(MIDDLE, fragment, seq)
        await peers.client.sctp._transmit()
        async with asyncio.timeout(30):
            await peers.abused.wait()
        assert peers.reasons == [f"a data-channel message grew past {MAX_MESSAGE_BYTES} bytes without ending"]
        guard = peers.guard
        assert MAX_MESSAGE_BYTES < guard.peak_held_bytes <= MAX_MESSAGE_BYTES + SLACK_BYTES + USERDATA_MAX_LENGTH
        assert guard.chunks == (MAX_MESSAGE_BYTES + SLACK_BYTES) // USERDATA_MAX_LENGTH + 2  # + the DCEP OPEN
        assert peers.held_bytes() == 0 and guard.held_bytes == 0
        # what the client has in flight or retransmits now is dropped unread
        await peers.client.sctp._transmit()
        assert peers.held_bytes() == 0 and len(peers.reasons) == 1


async def test_a_flood_of_small_valid_messages_trips_the_rate_limit():
    async with connected() as peers:
        received = []
        peers.server_channel.on("message", received.append)
        for i in range(5000):
            peers.channel.send(f"{i:05d}" + "x" * 995)
        async with asyncio.timeout(120):
            await peers.abused.wait()
        assert peers.reasons == ["the caller sent data-channel data faster than 65536 bytes/s"]
        assert 256 <= len(received) < 5000 and peers.guard.tripped == peers.reasons[0]
        assert peers.held_bytes() == 0


async def test_an_honest_caller_with_small_messages_is_never_stopped():
    async with connected() as peers:
        received: list[str] = []
        all_there = asyncio.Event()

        def on_message(message: str) -> None:
            received.append(message)
            if len(received) == 50:
                all_there.set()

        peers.server_channel.on("message", on_message)
        sent = [json.dumps({"type": "note", "n": i, "text": "y" * 160}) for i in range(50)]
        for message in sent:
            peers.channel.send(message)
            await asyncio.sleep(0.02)  # pacing, as a caller would: about a second in all
        async with asyncio.timeout(30):
            await all_there.wait()
        assert received == sent
        assert peers.guard.tripped is None and not peers.reasons and peers.guard.chunks >= 50


async def test_a_text_message_that_is_not_utf8_trips_the_guard_instead_of_ending_the_transport():
    """aiortc decodes text messages in its SCTP receive path: the UnicodeDecodeError would close the DTLS
    transport (and the call's audio with it) with only a traceback in the log."""
    async with connected() as peers:
        peers.queue_chunk(SCTP_DATA_FIRST_FRAG | SCTP_DATA_LAST_FRAG, b"\xff\xfe\xfd", peers.next_stream_seq(),
                          pp_id=WEBRTC_STRING)
        await peers.client.sctp._transmit()
        async with asyncio.timeout(30):
            await peers.abused.wait()
        assert peers.reasons == ["the caller sent a data-channel text message that is not UTF-8"]
        assert peers.server.sctp.transport.state == "connected"


def test_with_max_message_size_sets_or_adds_the_attribute():
    app = "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:1\r\na=sctp-port:5000\r\n"
    audio = "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n"
    head = "v=0\r\ns=-\r\n"
    assert with_max_message_size(head + audio + app + "a=max-message-size:262144\r\n") == (
        head + audio + app + "a=max-message-size:16384\r\n")
    assert with_max_message_size(head + app + audio, 1000) == head + app + "a=max-message-size:1000\r\n" + audio
    assert with_max_message_size(head + audio) == head + audio  # no data channel, nothing to bound
    lf = (head + app).replace("\r\n", "\n")
    assert with_max_message_size(lf.rstrip("\n")) == lf + "a=max-message-size:16384\n"


async def test_a_real_answer_carries_the_bound_and_an_aiortc_caller_keeps_to_it():
    async with connected() as peers:
        sdp = with_max_message_size(peers.server.localDescription.sdp)
        assert re.findall(r"^a=max-message-size:(\d+)\r$", sdp, re.MULTILINE) == [str(MAX_MESSAGE_BYTES)]
        with pytest.raises(ValueError, match="up to 16384 bytes"):
            peers.channel.send(b"z" * (MAX_MESSAGE_BYTES + 1))


# -- the guard alone, on a real (unconnected) aiortc SCTP transport, with a clock of our own ---------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Fed:
    """A guarded RTCSctpTransport that nobody connected: DATA chunks go in through aiortc's own handler."""

    def __init__(self, **limits) -> None:
        dtls = RTCDtlsTransport(RTCIceTransport(RTCIceGatherer()), [RTCCertificate.generateCertificate()])
        self.sctp = RTCSctpTransport(dtls)
        self.tsn = 1000
        self.sctp._last_received_tsn = tsn_minus_one(self.tsn)
        self.clock = Clock()
        self.reasons: list[str] = []
        self.guard = DataChannelGuard(self.sctp, self.reasons.append, clock=self.clock, **limits)

    async def chunk(self, flags: int, size: int, stream_id: int = 1, seq: int = 0, skip: int = 0) -> None:
        chunk = DataChunk(flags=flags)
        self.tsn += skip
        chunk.tsn, chunk.stream_id, chunk.stream_seq, chunk.protocol = self.tsn, stream_id, seq, WEBRTC_BINARY
        chunk.user_data = b"u" * size
        self.tsn += 1
        await self.sctp._receive_data_chunk(chunk)

    async def message(self, size: int, **kwargs) -> None:
        await self.chunk(SCTP_DATA_FIRST_FRAG | SCTP_DATA_LAST_FRAG | SCTP_DATA_UNORDERED, size, **kwargs)


async def test_the_buckets_allow_a_burst_and_the_sustained_rate_and_trip_once_beyond():
    fed = Fed(bytes_per_s=1000, burst_bytes=3000, chunks_per_s=10, burst_chunks=5)
    for _ in range(3):
        await fed.message(1000)  # the byte burst, at once
    fed.clock.now += 1.0
    await fed.message(1000)  # a second's worth came back
    fed.clock.now += 0.5
    await fed.message(400)
    assert fed.reasons == [] and fed.guard.chunks == 5 and fed.guard.bytes == 4400
    await fed.message(200)  # 100 bytes of tokens left
    assert fed.reasons == ["the caller sent data-channel data faster than 1000 bytes/s"]
    await fed.message(1)
    fed.clock.now += 60
    await fed.message(1)
    assert len(fed.reasons) == 1 and fed.guard.dropped == 2 and fed.guard.chunks == 6

    fed = Fed(chunks_per_s=8, burst_chunks=5)
    for _ in range(80):  # 8 a second, for 10 s
        fed.clock.now += 0.125
        await fed.message(10)
    fed.clock.now += 0.125  # the bucket is full again
    for _ in range(5):
        await fed.message(10)
    assert fed.reasons == []
    await fed.message(10)
    assert fed.reasons == ["the caller sent data-channel chunks faster than 8 a second"]


async def test_tiny_fragments_are_bounded_by_their_count():
    fed = Fed()
    await fed.chunk(SCTP_DATA_FIRST_FRAG, 1)
    for _ in range(MAX_HELD_CHUNKS):
        await fed.chunk(MIDDLE, 1)
    assert fed.reasons == [f"the caller left more than {MAX_HELD_CHUNKS} data-channel fragments undelivered"]
    assert not fed.sctp._inbound_streams[1].reassembly


async def test_unfinished_messages_on_many_streams_are_bounded_together():
    fed = Fed()
    for stream_id in range(1, 40, 2):
        await fed.chunk(SCTP_DATA_FIRST_FRAG, 1000, stream_id=stream_id)
    assert fed.reasons == [f"the caller left more than {MAX_MESSAGE_BYTES} bytes of data-channel messages "
                           "unfinished, over 18 streams"]
    assert all(not stream.reassembly for stream in fed.sctp._inbound_streams.values())


async def test_a_gap_that_is_never_filled_is_bounded():
    fed = Fed()
    await fed.message(10, skip=1)  # one TSN never comes: every later one stays "misordered" in aiortc
    for _ in range(MAX_HELD_CHUNKS):
        await fed.message(10)
    assert fed.reasons == [f"the caller left a gap in its data-channel chunks, with more than {MAX_HELD_CHUNKS} "
                           "chunks past it"]


async def test_a_complete_message_over_the_bound_is_not_delivered():
    fed = Fed()
    delivered = []

    async def deliver(stream_id: int, pp_id: int, data: bytes) -> None:
        delivered.append(len(data))

    fed.guard._receive = deliver
    await fed.message(MAX_MESSAGE_BYTES)
    await fed.message(MAX_MESSAGE_BYTES + 1)
    assert delivered == [MAX_MESSAGE_BYTES]
    assert fed.reasons == [f"the caller sent a data-channel message of {MAX_MESSAGE_BYTES + 1} bytes, over the "
                           f"{MAX_MESSAGE_BYTES} the server takes"]


async def test_an_aiortc_without_the_wrapped_method_is_refused():
    sctp = SimpleNamespace(_receive=lambda *args: None, _inbound_streams={}, _sack_misordered=set())
    with pytest.raises(AiortcChanged, match="_receive_data_chunk"):
        guard_data_channels(SimpleNamespace(sctp=sctp), lambda reason: None)
    sctp._receive_data_chunk = lambda chunk: None
    del sctp._sack_misordered
    with pytest.raises(AiortcChanged, match="_sack_misordered"):
        guard_data_channels(SimpleNamespace(sctp=sctp), lambda reason: None)
    assert guard_data_channels(SimpleNamespace(sctp=None), lambda reason: None) is None


async def test_a_caller_abusing_the_data_channel_ends_its_own_call_only(echo_server):
    """Through the real server: a stranger (127.0.0.2) starts a message on `events` that never ends. Its
    call ends as data_channel_abuse, saying why; a caller beside it keeps its call and hears its echo."""
    import aiohttp
    import numpy as np
    from test_abuse import STRANGER, from_address
    from test_call_e2e import tone

    from server.caller import place_call
    from server.media.audio_out import OutboundAudioTrack

    honest = asyncio.ensure_future(place_call(echo_server.url, tone(440, 3.0, -20.0), tail_s=0.3))
    attacker = Peers(RTCPeerConnection(), None)
    voice = OutboundAudioTrack(sample_rate=48000, max_buffer_ms=20_000)
    voice.push(np.zeros(48000 * 10, np.float32) + 0.05)
    attacker.client.addTrack(voice)
    attacker.channel = attacker.client.createDataChannel("events")
    opened = asyncio.Event()
    attacker.channel.on("open", opened.set)
    try:
        await attacker.client.setLocalDescription(await attacker.client.createOffer())
        offer = {"sdp": attacker.client.localDescription.sdp, "type": "offer"}
        async with from_address(STRANGER) as http, http.post(f"{echo_server.url}/offer", json=offer) as response:
            answer = await response.json()
        assert f"a=max-message-size:{MAX_MESSAGE_BYTES}" in answer["sdp"]
        await attacker.client.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        session = echo_server.service.sessions[answer["session_id"]]
        async with asyncio.timeout(30):
            await opened.wait()
        seq = attacker.next_stream_seq()
        attacker.queue_chunk(SCTP_DATA_FIRST_FRAG, b"x" * USERDATA_MAX_LENGTH, seq)
        for _ in range(100):
            attacker.queue_chunk(MIDDLE, b"x" * USERDATA_MAX_LENGTH, seq)
        await attacker.client.sctp._transmit()
        async with asyncio.timeout(30):
            await session.ended.wait()
        assert session.end_kind == "data_channel_abuse" and "without ending" in session.end_reason
        recording = await honest
        assert recording.end_reason in (None, "hung up") and np.abs(recording.audio).max() > 0.05
        async with aiohttp.ClientSession() as http, http.get(f"{echo_server.url}/metrics") as response:
            assert 'moshi_calls_ended_total{reason="data_channel_abuse"} 1.0' in await response.text()
    finally:
        await attacker.client.close()
        honest.cancel()
