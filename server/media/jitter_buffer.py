"""An adaptive jitter buffer for one inbound audio stream: when each packet's slot is played, and with what.

A pure data structure (no clock, no I/O, no codec), in the style of aiortc's
own: packets go in with their arrival time; `pop(now)` says what fills the
next slot of media time once that slot is due, else None.

When is a slot due? Each packet's transit (arrival time minus its RTP time)
is compared with the fastest transit seen in the last few seconds: that
excess is its delay. The target delay is a high quantile of recent delays
(or the largest of the last second, so it rises at once) plus a small
margin, never under one packet (20 ms: the loop that runs it has hiccups of
its own), so it sits near one packet on a clean link, grows with jitter and shrinks
back a few seconds after the jitter calms (like a browser's NetEq). The
first half second, before any jitter is known, starts from 40 ms. A slot is
due at its RTP time + the fastest transit + the target: on time packets
wait at most the target; a missing packet is waited for exactly that long,
never until some buffer fills.

What fills a due slot, in media time order, exactly `ticks` RTP units each:
- `Play`: its packet arrived;
- `Recover`: it is lost, but the next packet is here and may carry in-band
  FEC for it (the decoder knows; it conceals if there is none);
- `Conceal`: it is lost; libopus extrapolates;
- `Silence`: a gap the sender left in RTP time (discontinuous transmission).

After `max_conceal_s` of loss in a row the stream pauses: nothing more is
made up (concealment would only fade, and a caller who stopped sending
should not keep the model busy); the next packet to arrive starts it again
from its own time.

While the sender's packets carry in-band FEC, the target is one packet
longer: a loss is then decided when the next packet (which can restore it)
should be here. A packet whose slot was already filled arrives late and is dropped; a
packet far from the expected sequence (a restarted sender, a new SSRC)
restarts the buffer. Memory is bounded by `capacity` packets.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

SEQ_MOD = 1 << 16
TS_MOD = 1 << 32


@dataclass(frozen=True)
class Play:
    payload: bytes
    ticks: int


@dataclass(frozen=True)
class Recover:
    next_payload: bytes
    ticks: int


@dataclass(frozen=True)
class Conceal:
    ticks: int


@dataclass(frozen=True)
class Silence:
    ticks: int


Slot = Play | Recover | Conceal | Silence


@dataclass
class JitterStats:
    received: int = 0
    played: int = 0
    lost: int = 0  # slots whose packet had not arrived when they were due
    late: int = 0  # packets that arrived after their slot was filled without them
    duplicates: int = 0
    restarts: int = 0  # sequence or SSRC jumps that restarted the buffer
    pauses: int = 0  # losses longer than max_conceal_s, after which the stream went on from a later packet
    discarded: int = 0  # packets beyond the buffer's capacity


@dataclass
class _Packet:
    seq: int  # extended (unwrapped) sequence number
    ts: int  # extended RTP timestamp
    payload: bytes
    ticks: int  # its duration in RTP units


class _Delays:
    """Recent (arrival, transit) pairs; the fastest transit, and how late packets come beyond it.

    Kept so that each packet costs O(log n) rather than a scan and a sort of the whole window (200
    packets: 8 to 12% of the server's CPU with 6 echo calls, profiled): the window's transits also sit
    in a sorted list, and the largest transit of the last `attack_s` at the front of a deque that
    decreases. Arrivals must not go back in time (one monotonic clock). The figures are exactly
    those of scanning the window: x -> x - fastest never reorders floats."""

    def __init__(self, window_s: float, attack_s: float):
        self.window_s = window_s
        self.attack_s = attack_s
        self.samples: deque[tuple[float, float]] = deque()
        self._sorted: list[float] = []  # the window's transits, ascending
        self._peaks: deque[tuple[float, float]] = deque()  # (arrival, transit), transits decreasing

    def add(self, arrival: float, transit: float) -> None:
        samples, ordered = self.samples, self._sorted
        samples.append((arrival, transit))
        bisect.insort(ordered, transit)
        while samples[0][0] < arrival - self.window_s:
            del ordered[bisect.bisect_left(ordered, samples.popleft()[1])]
        peaks = self._peaks
        while peaks and peaks[-1][1] <= transit:
            peaks.pop()
        peaks.append((arrival, transit))

    def fastest(self) -> float:
        return self._sorted[0]

    def spread(self, q: float, fastest: float) -> float:
        """A high quantile of the excess transit over `fastest` in the window, or the largest excess of the
        last `attack_s` if that is more: the target rises at the first late packets and falls slowly."""
        ordered, peaks = self._sorted, self._peaks
        newest = self.samples[-1][0]
        horizon = newest - min(self.attack_s, self.window_s)
        while peaks[0][0] < horizon:  # the newest sample is always a peak: this never empties it
            peaks.popleft()
        recent = peaks[0][1] - fastest
        return max(recent, ordered[min(len(ordered) - 1, int(q * len(ordered)))] - fastest)

    def clear(self) -> None:
        self.samples.clear()
        self._sorted.clear()
        self._peaks.clear()


class JitterBuffer:
    """One RTP audio stream's buffer. Times are seconds on any monotonic clock; `ticks` are RTP units."""

    def __init__(
        self,
        clock_rate: int = 48000,
        packet_ticks: int = 960,
        window_s: float = 4.0,
        attack_s: float = 1.0,
        quantile: float = 0.95,
        start_target_s: float = 0.04,
        start_packets: int = 25,
        margin_s: float = 0.004,
        min_target_s: float = 0.02,
        max_target_s: float = 0.4,
        max_conceal_s: float = 0.1,
        capacity: int = 64,
        max_gap_s: float = 2.0,
    ):
        self.clock_rate = clock_rate
        self.packet_ticks = packet_ticks
        self.quantile = quantile
        self.margin_s = margin_s
        self.min_target_s = min_target_s
        self.max_target_s = max_target_s
        self.max_conceal_ticks = int(max_conceal_s * clock_rate)
        self.capacity = capacity
        self.max_gap_ticks = int(max_gap_s * clock_rate)
        self.stats = JitterStats()
        self._delays = _Delays(window_s, attack_s)
        self.start_target_s = start_target_s
        self.start_packets = start_packets
        self._started = False  # a slot has been filled
        self._packets: dict[int, _Packet] = {}
        self._seqs: list[int] = []  # sorted keys of _packets
        self._ssrc: int | None = None
        self._highest_seq: int | None = None
        self._last_ts: int | None = None
        self._next_seq: int | None = None
        self._next_ts: int | None = None
        self._lost_ticks_in_a_row = 0
        self._missed: deque[int] = deque(maxlen=capacity)  # recent slots filled without their packet
        self._fec_seen_at: float | None = None
        self._fastest = 0.0
        self._paused = False
        self._last_played_seq = -1
        self.target_s = max(min_target_s, margin_s)

    # -- in ---------------------------------------------------------------------------------------

    def add(self, seq: int, timestamp: int, payload: bytes, arrival: float, ssrc: int = 0,
            ticks: int | None = None, has_fec: bool = False) -> None:
        """One RTP packet as it arrived (`seq` and `timestamp` as on the wire: 16 and 32 bits; `ticks`: its
        duration in RTP units where the caller's codec knows it, else the last one learned; `has_fec`: it
        carries in-band FEC for the packet before it)."""
        self.stats.received += 1
        if has_fec:
            self._fec_seen_at = arrival
        if self._ssrc is not None and ssrc != self._ssrc:
            self._restart()
        self._ssrc = ssrc
        ext_seq, ext_ts = self._unwrap(seq, timestamp)
        if self._next_seq is not None and abs(ext_seq - self._next_seq) > 4 * self.capacity:
            self._restart()  # a restarted sender: nothing before this packet belongs to its stream
            self._ssrc = ssrc
            ext_seq, ext_ts = self._unwrap(seq, timestamp)
        if self._next_seq is None:
            self._next_seq, self._next_ts = ext_seq, ext_ts
        elif self._paused and ext_ts >= self._next_ts:
            self._paused = False
            self._lost_ticks_in_a_row = 0
            if ext_seq == self._last_played_seq + 1 and ext_ts - self._next_ts <= self.max_gap_ticks:
                self._next_seq = ext_seq  # nothing was lost: the sender was quiet (DTX); its gap is silence
            else:  # the stream comes back after a loss: go on from this packet's time
                self.stats.pauses += 1
                self._drop_before(ext_seq)
                self._next_seq, self._next_ts = ext_seq, ext_ts

        self._delays.add(arrival, arrival - ext_ts / self.clock_rate)
        self._fastest = self._delays.fastest()
        target = self._delays.spread(self.quantile, self._fastest) + self.margin_s
        if len(self._delays.samples) < self.start_packets:  # too few packets to know the jitter yet
            target = max(target, self.start_target_s)
        if self._fec_seen_at is not None and arrival - self._fec_seen_at < self._delays.window_s:
            target += self.packet_ticks / self.clock_rate  # wait for the next packet: its FEC can restore a loss
        self.target_s = min(self.max_target_s, max(self.min_target_s, target))

        if ext_ts < self._next_ts:  # its slot was filled already
            if ext_seq in self._missed:
                self.stats.late += 1
            else:
                self.stats.duplicates += 1
            return
        if ext_seq in self._packets:
            self.stats.duplicates += 1
            return
        if not self._started and ext_seq < self._next_seq:  # an earlier packet came second: start there
            self._next_seq, self._next_ts = ext_seq, ext_ts
        if ext_seq < self._next_seq:
            # The sender skipped RTP time (contiguous sequence numbers, a jump in timestamps, as
            # discontinuous transmission does) and the slots meanwhile were filled: its media time is ahead.
            self._drop_before(ext_seq)
            self._next_seq = ext_seq
        if ext_seq >= self._next_seq + self.capacity:
            self.stats.discarded += 1
            return
        self._packets[ext_seq] = _Packet(ext_seq, ext_ts, payload, ticks or self.packet_ticks)
        bisect.insort(self._seqs, ext_seq)

    def _unwrap(self, seq: int, timestamp: int) -> tuple[int, int]:
        if self._highest_seq is None:
            ext_seq, ext_ts = seq, timestamp
        else:
            ext_seq = self._highest_seq + _signed(seq - self._highest_seq, SEQ_MOD)
            ext_ts = self._last_ts + _signed(timestamp - self._last_ts, TS_MOD)
        if self._highest_seq is None or ext_seq > self._highest_seq:
            self._highest_seq, self._last_ts = ext_seq, ext_ts
        return ext_seq, ext_ts

    def _restart(self) -> None:
        self.stats.restarts += 1
        self._packets.clear()
        self._seqs.clear()
        self._delays.clear()
        self._highest_seq = self._last_ts = self._next_seq = self._next_ts = None
        self._lost_ticks_in_a_row = 0
        self._missed.clear()
        self._started = False
        self._paused = False
        self._last_played_seq = -1

    def _remove(self, packet: _Packet) -> None:
        del self._packets[packet.seq]
        self._seqs.remove(packet.seq)

    def _drop_before(self, seq: int) -> None:
        while self._seqs and self._seqs[0] < seq:
            del self._packets[self._seqs.pop(0)]

    # -- out --------------------------------------------------------------------------------------

    def due_at(self) -> float | None:
        """When the next slot is due (None before the first packet)."""
        if self._next_ts is None or not self._delays.samples or self._paused:
            return None
        return self._next_ts / self.clock_rate + self._fastest + self.target_s

    def missing_and_due(self, now: float) -> bool:
        """Whether the next slot is due at `now` and its packet is not here: `pop` would call it lost."""
        due = self.due_at()
        return due is not None and now >= due and self._next_seq not in self._packets

    def pop(self, now: float) -> Slot | None:
        """What fills the next slot, if it is due at `now`; call again until None."""
        due = self.due_at()
        if due is None or now < due:
            return None
        self._started = True
        packet = self._packets.get(self._next_seq)
        while packet is not None and packet.ts < self._next_ts:  # its time was covered by a longer slot
            self._remove(packet)
            self.stats.late += 1
            self._next_seq += 1
            packet = self._packets.get(self._next_seq)
        if packet is not None:
            gap = packet.ts - self._next_ts
            if 0 < gap <= self.max_gap_ticks:
                self._next_ts = packet.ts  # the sender's own gap in RTP time: silence, not loss
                return Silence(gap)
            self._remove(packet)
            self.packet_ticks = packet.ticks
            self._last_played_seq = packet.seq
            self._next_seq, self._next_ts = packet.seq + 1, packet.ts + packet.ticks
            self._lost_ticks_in_a_row = 0
            self.stats.played += 1
            return Play(packet.payload, packet.ticks)
        # The slot's packet is missing and its time is up.
        ticks = self.packet_ticks
        following = self._packets.get(self._next_seq + 1)
        if following is None and self._lost_ticks_in_a_row >= self.max_conceal_ticks:
            self._paused = True  # until a packet comes
            return None
        self.stats.lost += 1
        if following is not None and following.ts == self._next_ts + ticks:
            slot: Slot = Recover(following.payload, ticks)
        else:
            slot = Conceal(ticks)
        self._lost_ticks_in_a_row += ticks
        self._missed.append(self._next_seq)
        self._next_seq += 1
        self._next_ts += ticks
        return slot

    # -- figures ----------------------------------------------------------------------------------

    @property
    def buffered_s(self) -> float:
        """Media time waiting in the buffer, from the next slot to the end of the newest packet."""
        if not self._seqs or self._next_ts is None:
            return 0.0
        newest = self._packets[self._seqs[-1]]
        return max(0, newest.ts + self.packet_ticks - self._next_ts) / self.clock_rate

    @property
    def packets_held(self) -> int:
        return len(self._packets)


def _signed(delta: int, modulus: int) -> int:
    """A wrapped difference as the nearest signed value."""
    delta %= modulus
    return delta - modulus if delta >= modulus // 2 else delta
