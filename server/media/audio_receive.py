"""One call's inbound audio, from RTP packets to engine frames: our own receive path.

    RTP packet (from aiortc, see server.media.aiortc_compat) --> JitterBuffer (when each 20 ms slot is due)
        --> libopus (decode, in-band FEC, concealment, at 24 kHz mono) --> InboundAudio (1920-sample frames)
        --> on_frame(samples)

aiortc's own audio receive path waits on a missing packet until a fixed
buffer fills and then stays that deep, throws away what it had buffered,
and never conceals: one lost packet added 200 ms to the rest of a call and
5% loss silenced 23% of a caller's audio (issue #13). This path decides
each slot on time (server.media.jitter_buffer), restores a lost packet from the
next one's FEC or conceals it, and keeps media time exact: every 20 ms of
the caller's RTP time becomes exactly 20 ms of samples, so the engine's
frames never shift.

Everything runs on the event loop: a packet is added as it arrives, and a
timer fires when the next slot is due. Nothing a caller sends can raise out
of `on_packet`: garbage is counted and its slot concealed.

When the loop itself was held up (a long step elsewhere, a GC pause, a
starved core), the caller's packets of that time wait unread in the socket,
and the slot timer may fire before they are read (aiortc carries a packet
from the socket to us over a loop turn or two): it must not conceal them.
So a slot found missing is called lost only after `GRACE_TURNS` more loop
turns, each of which reads pending I/O first. And a slot timer, or a grace
turn, late by more than `STALL_TOLERANCE_S` (a long stall, many packets
waiting) holds the playout
clock back by that much and a packet more; the hold runs off at the loop's
own speed (playout at twice real time), by which time the packets are read
and play in their slots. Stalls are counted. The price: the model hears that
audio late, and the reply's standing delay it leaves is shed downstream.

Frames leave at most at real time (server.media.real_time): a caller whose
packets come faster than its audio plays has the excess dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from ..audio.inbound import InboundAudio
from .jitter_buffer import Conceal, JitterBuffer, Play, Recover, Silence, Slot
from .opus_codec import OpusDecoder, OpusError
from .real_time import RealTimeGate

log = logging.getLogger(__name__)

RTP_CLOCK = 48000  # Opus's RTP clock, whatever rate it was encoded at (RFC 7587)
MAX_SILENCE_S = 2.0
STALL_TOLERANCE_S = 0.02  # a slot timer later than this (a packet's time): the loop was held up
GRACE_TURNS = 8  # loop turns a missing slot waits for packets already read from the socket (1 per turn)
ARRIVALS_KEPT = 64  # the latest packets' arrival times, for telling a live stream from a packet now and then


@dataclass
class ReceiveStats:
    """Per call, for /sessions/{id} and /metrics."""

    packets: int = 0
    played: int = 0  # slots filled by their own packet
    lost: int = 0  # slots whose packet was missing when due
    late: int = 0  # packets that came after their slot was filled without them
    duplicates: int = 0
    fec_packets: int = 0  # packets that carried in-band FEC (LBRR) for the packet before them
    recovered: int = 0  # lost packets restored from the next packet's in-band FEC
    concealed_ms: int = 0  # audio made up by libopus's concealment
    silence_ms: int = 0  # gaps in the sender's RTP time, and losses past the concealment limit
    bad_packets: int = 0  # not Opus: refused on arrival (their slots are concealed)
    unknown_payload_type: int = 0  # RTP with a payload type nobody negotiated (dropped by aiortc's router)
    decode_errors: int = 0  # parsed as Opus, but libopus could not decode them (concealed instead)
    restarts: int = 0
    loop_stalls: int = 0  # times the server's own event loop was held up and the playout clock held back
    loop_stalled_ms: int = 0  # how long those stalls were, summed
    frames_over_real_time: int = 0  # engine frames dropped: the caller sent faster than its audio plays
    pauses: int = 0  # losses past 100 ms, after which the stream went on from a later packet
    target_delay_ms: float = 0.0
    buffered_ms: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class AudioReceiver:
    """Feed RTP packets in (`on_packet`); whole engine frames come out through `on_frame`."""

    def __init__(
        self,
        on_frame: Callable[[np.ndarray], None],
        sample_rate: int = 24000,
        frame_size: int = 1920,
        loop: asyncio.AbstractEventLoop | None = None,
    ):
        self.on_frame = on_frame
        self.sample_rate = sample_rate
        self.loop = loop or asyncio.get_event_loop()
        self.buffer = JitterBuffer(clock_rate=RTP_CLOCK)
        self.decoder = OpusDecoder(sample_rate)
        self.framer = InboundAudio(sample_rate=sample_rate, frame_size=frame_size)
        self.gate = RealTimeGate(frame_size / sample_rate)
        self._stats = ReceiveStats()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due: float | None = None  # when `_timer` fires
        self._closed = False
        self._hold_s = 0.0  # how far the playout clock was set back at `_hold_since`, after a stall
        self._hold_since = 0.0
        self._grace_left = GRACE_TURNS  # turns the slot now missing may still wait
        self._grace: asyncio.Handle | None = None
        self._grace_since = 0.0  # when `_grace` was asked for: it is due in the very next loop turn
        self.last_packet_at: float | None = None  # loop time
        self._arrivals: deque[float] = deque(maxlen=ARRIVALS_KEPT)

    # -- in -------------------------------------------------------------------------------------

    def on_packet(self, ssrc: int, sequence_number: int, timestamp: int, payload: bytes) -> None:
        """One RTP packet of the caller's Opus stream, as it arrives. Never raises."""
        if self._closed:
            return
        now = self.loop.time()
        self.last_packet_at = now
        self._arrivals.append(now)
        self._stats.packets += 1
        try:
            samples = self.decoder.samples_in(payload) if payload else 0
        except OpusError:
            samples = 0
        if samples <= 0:
            self._stats.bad_packets += 1  # its slot will be concealed when it is due
        else:
            has_fec = self.decoder.has_fec(payload)
            self._stats.fec_packets += has_fec
            self.buffer.add(sequence_number, timestamp, payload, now, ssrc=ssrc,
                            ticks=samples * RTP_CLOCK // self.sample_rate, has_fec=has_fec)
        self._drain()

    def nth_latest_arrival(self, n: int) -> float | None:
        """When the `n`th latest packet came (1: the last one; at most ARRIVALS_KEPT), or None if fewer came."""
        return self._arrivals[-n] if 0 < n <= len(self._arrivals) else None

    def longest_recent_gap(self) -> float:
        """The longest wait between two of the latest packets (ARRIVALS_KEPT): how long the caller's audio
        stopped, when it just came back."""
        arrivals = list(self._arrivals)
        return max((b - a for a, b in zip(arrivals, arrivals[1:], strict=False)), default=0.0)

    def packets_since(self, since: float) -> int:
        """Packets that came at or after loop time `since` (counted among the latest ARRIVALS_KEPT)."""
        return sum(1 for arrival in self._arrivals if arrival >= since)

    def on_unroutable_packet(self, payload_type: int) -> None:
        """A packet of the caller's that no receiver takes (a payload type nobody negotiated): counted only."""
        self._stats.unknown_payload_type += 1
        if self._stats.unknown_payload_type == 1:
            log.warning("the caller sends RTP with payload type %d, which was not negotiated: dropped", payload_type)

    def close(self) -> None:
        self._closed = True
        for handle in (self._timer, self._grace):
            if handle is not None:
                handle.cancel()
        self.decoder.close()

    # -- out ------------------------------------------------------------------------------------

    def _drain(self) -> None:
        """Fill every slot that is due, then wake up when the next one is."""
        if self._closed:
            return
        now = self.loop.time()
        playout = now - self._held_back(now)
        while True:
            if self.buffer.missing_and_due(playout) and self._grace_left > 0:
                self._grace_left -= 1  # the packet may be read in the next turn: look again then
                if self._grace is None:
                    self._grace = self.loop.call_soon(self._on_grace_turn)
                    self._grace_since = now
                return
            slot = self.buffer.pop(playout)
            if slot is None:
                break
            self._grace_left = GRACE_TURNS
            for frame in self.framer.push_samples(self._render(slot)):
                if not self.gate.admit(now):
                    self._stats.frames_over_real_time += 1
                    continue
                try:
                    self.on_frame(frame)
                except Exception:  # the consumer's failure must not stop the clock or reach aiortc
                    log.exception("inbound audio consumer failed")
        due = self._loop_time_for(self.buffer.due_at())
        if due == self._timer_due:  # a packet often leaves the next slot's time as it was: keep the timer
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(due, self._on_timer) if due is not None else None
        self._timer_due = due

    def _on_grace_turn(self) -> None:
        now = self.loop.time()
        self._grace = None
        self._note_stall(now, now - self._grace_since)
        self._drain()

    def _on_timer(self) -> None:
        now = self.loop.time()
        late = now - self._timer_due if self._timer_due is not None else 0.0
        self._timer = self._timer_due = None
        self._note_stall(now, late)
        self._drain()

    def _note_stall(self, now: float, late: float) -> None:
        """A slot timer, or a grace turn (due in the next turn), ran `late`: past the tolerance, the loop was
        held up and the packets of that time may be unread yet, so the playout clock holds back. A stall can
        find either one pending: a grace turn waits for a missing packet with no slot timer set."""
        if late <= STALL_TOLERANCE_S:
            return
        self._stats.loop_stalls += 1
        self._stats.loop_stalled_ms += round(1000 * late)
        self._hold_s = max(self._held_back(now), late + self.buffer.packet_ticks / RTP_CLOCK)
        self._hold_since = now

    def _held_back(self, now: float) -> float:
        """How far the playout clock runs behind the loop's now: a stall's hold, running off at 1 s per s."""
        return max(0.0, self._hold_s - (now - self._hold_since))

    def _loop_time_for(self, due: float | None) -> float | None:
        """The loop time at which the playout clock reaches `due`."""
        if due is None or self._held_back(due) == 0.0:
            return due
        # playout(t) = t - (hold - (t - since)) = 2t - hold - since, while the hold lasts; a microsecond more,
        # or rounding can leave playout a hair short of `due` when the timer fires, and it fires again at once
        return (due + self._hold_s + self._hold_since) / 2 + 1e-6

    def _render(self, slot: Slot) -> np.ndarray:
        """Exactly the slot's duration of audio, whatever libopus returns."""
        samples = slot.ticks * self.sample_rate // RTP_CLOCK
        if isinstance(slot, Silence):
            self._stats.silence_ms += 1000 * samples // self.sample_rate
            return np.zeros(min(samples, int(MAX_SILENCE_S * self.sample_rate)), dtype=np.float32)
        try:
            if isinstance(slot, Play):
                audio = self.decoder.decode(slot.payload)
            elif isinstance(slot, Recover) and self.decoder.has_fec(slot.next_payload):
                audio = self.decoder.decode_fec(slot.next_payload, samples)
                self._stats.recovered += 1
            else:
                assert isinstance(slot, (Recover, Conceal))
                audio = self._conceal(samples)
        except OpusError:
            self._stats.decode_errors += 1
            audio = self._conceal(samples)
        if len(audio) != samples:
            audio = np.pad(audio, (0, max(0, samples - len(audio))))[:samples]
        return audio

    def _conceal(self, samples: int) -> np.ndarray:
        self._stats.concealed_ms += 1000 * samples // self.sample_rate
        return self.decoder.conceal(samples)

    # -- figures --------------------------------------------------------------------------------

    @property
    def target_delay_s(self) -> float:
        return self.buffer.target_s

    @property
    def stats(self) -> ReceiveStats:
        jitter = self.buffer.stats
        self._stats.played, self._stats.lost, self._stats.late = jitter.played, jitter.lost, jitter.late
        self._stats.pauses = jitter.pauses
        self._stats.duplicates, self._stats.restarts = jitter.duplicates, jitter.restarts
        self._stats.target_delay_ms = round(1000 * self.buffer.target_s, 1)
        self._stats.buffered_ms = round(1000 * self.buffer.buffered_s, 1)
        return self._stats
