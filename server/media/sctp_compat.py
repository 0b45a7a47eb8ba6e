"""Bounds on what a caller can send on the data channel, through aiortc's private SCTP receive path, pinned.

aiortc 1.16 keeps each fragment of an unfinished data-channel message (`RTCSctpTransport._inbound_streams`,
`InboundStream.reassembly`) without a limit, rescans that list from its start on every new chunk, and
advertises `a=max-message-size:262144`: a caller that starts a message and never ends it holds the worker
at about a core while its memory grows. aiortc has no hook for this, so `DataChannelGuard` wraps two methods
of the transport instance (`_receive_data_chunk`, and `_receive`, which hands on complete messages); like
server/media/aiortc_compat.py it is pinned to aiortc 1.16 and raises `AiortcChanged` (naming what moved)
rather than guarding nothing after an upgrade. This is the only module that touches aiortc's SCTP privates.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

import aiortc
from aiortc import RTCPeerConnection
from aiortc.rtcsctptransport import InboundStream

from .aiortc_compat import AiortcChanged, check_version

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16384  # one data-channel message, as the server takes it: the events channel carries short JSON
MAX_HELD_CHUNKS = 256  # fragments held undelivered: a max-size message is about 15, so this allows much reordering
SLACK_BYTES = 1280  # one DATA chunk at the IPv6 minimum MTU: a fragment of another message in flight
BYTES_PER_S, BURST_BYTES = 65536, 262144
CHUNKS_PER_S, BURST_CHUNKS = 200, 1000

_MAX_MESSAGE_SIZE = re.compile(r"^a=max-message-size:[^\r\n]*", re.MULTILINE)
_SECTION = re.compile(r"^(?=m=)", re.MULTILINE)
_WRAPPED = ("_receive_data_chunk", "_receive")


def with_max_message_size(sdp: str, size: int = MAX_MESSAGE_BYTES) -> str:
    """`sdp` with `a=max-message-size:size` in its m=application section (set, or added): honest callers
    (browsers, aiortc) then refuse to send a message larger than the server takes."""
    eol = "\r\n" if "\r\n" in sdp else "\n"
    line = f"a=max-message-size:{size}"
    sections = _SECTION.split(sdp)
    for i, section in enumerate(sections):
        if not section.startswith("m=application"):
            continue
        if _MAX_MESSAGE_SIZE.search(section):
            sections[i] = _MAX_MESSAGE_SIZE.sub(line, section)
        else:
            sections[i] = (section if section.endswith("\n") else section + eol) + line + eol
    return "".join(sections)


class _Bucket:
    """Tokens refilled at `rate` a second up to `burst`: a sustained rate, with room for a burst."""

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst, self.tokens, self.last = rate, burst, float(burst), now

    def take(self, amount: float, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = now
        self.tokens -= amount
        return self.tokens >= 0


class DataChannelGuard:
    """Sees each DATA chunk of one SCTP transport before aiortc does. The first time the caller goes past a
    bound (rate, bytes or fragments held unfinished, one message's size) it calls `on_abuse(reason)` once,
    drops what aiortc held, and from then on drops every DATA chunk unprocessed: the call is to end.
    Per chunk it costs O(1), plus a sum over the chunk's stream's held fragments (at most MAX_HELD_CHUNKS,
    about what aiortc's own rescan of that list costs)."""

    def __init__(self, sctp: Any, on_abuse: Callable[[str], None], *, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 max_held_chunks: int = MAX_HELD_CHUNKS, bytes_per_s: float = BYTES_PER_S,
                 burst_bytes: float = BURST_BYTES, chunks_per_s: float = CHUNKS_PER_S,
                 burst_chunks: float = BURST_CHUNKS, clock: Callable[[], float] = time.monotonic):
        check_version()
        for name in _WRAPPED:
            if not callable(getattr(sctp, name, None)):
                raise AiortcChanged(f"aiortc {aiortc.__version__}'s RTCSctpTransport has no {name}")
        for name, kind in (("_inbound_streams", dict), ("_sack_misordered", set)):
            if not isinstance(getattr(sctp, name, None), kind):
                raise AiortcChanged(f"aiortc {aiortc.__version__}'s RTCSctpTransport has no {name} {kind.__name__}")
        if not isinstance(getattr(InboundStream(), "reassembly", None), list):
            raise AiortcChanged(f"aiortc {aiortc.__version__}'s InboundStream has no reassembly list")
        self._sctp, self._on_abuse, self._clock = sctp, on_abuse, clock
        self.max_message_bytes, self.max_held_chunks = max_message_bytes, max_held_chunks
        self.max_held_bytes = max_message_bytes + SLACK_BYTES
        now = clock()
        self._bytes = _Bucket(bytes_per_s, burst_bytes, now)
        self._chunks = _Bucket(chunks_per_s, burst_chunks, now)
        self.chunks = self.bytes = self.dropped = 0  # DATA chunks and their user data seen; chunks dropped unseen
        self.held_chunks = self.held_bytes = self.peak_held_bytes = 0  # in aiortc's reassembly (at most: see _recount)
        self.tripped: str | None = None
        self._held: dict[int, tuple[int, int]] = {}  # stream id -> (fragments, bytes) held, as last seen
        self._receive_data_chunk, self._receive = sctp._receive_data_chunk, sctp._receive
        sctp._receive_data_chunk, sctp._receive = self._on_data_chunk, self._on_message

    async def _on_data_chunk(self, chunk: Any) -> None:
        if self.tripped is not None:
            self.dropped += 1
            return
        size = len(chunk.user_data)
        self.chunks += 1
        self.bytes += size
        now = self._clock()
        if not self._bytes.take(size, now):
            self._trip(f"the caller sent data-channel data faster than {self._bytes.rate:g} bytes/s")
        elif not self._chunks.take(1, now):
            self._trip(f"the caller sent data-channel chunks faster than {self._chunks.rate:g} a second")
        else:
            await self._receive_data_chunk(chunk)
            if self.tripped is None:
                self._check_held(chunk.stream_id)

    async def _on_message(self, stream_id: int, pp_id: int, data: bytes) -> None:
        """A complete message, on its way to aiortc's data channel: too large, or one that aiortc's handler
        would raise on (which would end the DTLS transport, audio and all, with no reason given), trips."""
        if self.tripped is not None:
            return
        if len(data) > self.max_message_bytes:
            self._trip(f"the caller sent a data-channel message of {len(data)} bytes, over the "
                       f"{self.max_message_bytes} the server takes")
            return
        try:
            await self._receive(stream_id, pp_id, data)
        except UnicodeDecodeError:
            self._trip("the caller sent a data-channel text message that is not UTF-8")
        except AssertionError:  # aiortc asserts on DCEP: an OPEN for an open channel, an ACK for none
            self._trip("the caller sent a data-channel control message (DCEP) out of turn")

    def _check_held(self, stream_id: int) -> None:
        stream = self._sctp._inbound_streams.get(stream_id)
        held = stream.reassembly if stream is not None else []
        count, size = len(held), sum(len(c.user_data) for c in held)  # bounded: we trip past max_held_chunks
        old_count, old_size = self._held.pop(stream_id, (0, 0))
        if count:
            self._held[stream_id] = (count, size)
        self.held_chunks += count - old_count
        self.held_bytes += size - old_size
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
        if size > self.max_held_bytes:
            self._trip(f"a data-channel message grew past {self.max_message_bytes} bytes without ending")
        elif self.held_bytes > self.max_held_bytes or self.held_chunks > self.max_held_chunks:
            self._recount()  # streams reset or pruned (FORWARD TSN) since last seen hold less than counted
            if self.held_bytes > self.max_held_bytes:
                self._trip(f"the caller left more than {self.max_message_bytes} bytes of data-channel messages "
                           f"unfinished, over {len(self._held)} streams")
            elif self.held_chunks > self.max_held_chunks:
                self._trip(f"the caller left more than {self.max_held_chunks} data-channel fragments undelivered")
        if self.tripped is None and len(self._sctp._sack_misordered) > self.max_held_chunks:
            # aiortc sorts this set on every chunk; unordered messages past a gap leave it growing
            self._trip(f"the caller left a gap in its data-channel chunks, with more than {self.max_held_chunks} "
                       "chunks past it")

    def _recount(self) -> None:
        """Held fragments only shrink outside our sight, so a recount costs at most what was counted."""
        streams, last_seen = self._sctp._inbound_streams, self._held
        self._held = {}
        for stream_id in last_seen:
            held = getattr(streams.get(stream_id), "reassembly", None)
            if held:
                self._held[stream_id] = (len(held), sum(len(c.user_data) for c in held))
        self.held_chunks = sum(count for count, _ in self._held.values())
        self.held_bytes = sum(size for _, size in self._held.values())

    def _trip(self, reason: str) -> None:
        self.tripped = reason
        for stream in self._sctp._inbound_streams.values():
            stream.reassembly = []
        self._held.clear()
        self.held_chunks = self.held_bytes = 0
        try:
            self._on_abuse(reason)
        except Exception:  # the SCTP receive path must go on (dropping) whatever the owner's callback does
            log.exception("on_abuse failed for: %s", reason)


def guard_data_channels(pc: RTCPeerConnection, on_abuse: Callable[[str], None],
                        **limits: Any) -> DataChannelGuard | None:
    """Guard `pc`'s data channels (see DataChannelGuard; `limits` are its keyword arguments). Call it after
    setRemoteDescription of an offer with an m=application section; None when there is none (no pc.sctp)."""
    check_version()
    sctp = getattr(pc, "sctp", None)
    return DataChannelGuard(sctp, on_abuse, **limits) if sctp is not None else None
