"""The receive path's bad-input contract, driven packet by packet on a manual clock.

Whatever RTP arrives (garbage or truncated Opus, sequence and timestamp jumps and wraps, a new SSRC,
floods of duplicates and reordered packets), `AudioReceiver.on_packet` never raises, the clock never
stalls, memory stays bounded, every oddity is counted, and only whole frames of finite samples in
[-1, 1] come out, exactly 20 ms of them for every 20 ms slot. Time is a manual clock (a stand-in for
the event loop's `time` and `call_at`), so nothing depends on the machine's speed.
"""

from __future__ import annotations

import heapq
import itertools
import random

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_opus_codec import encode, tone

from server.media.audio_receive import AudioReceiver

PACKETS = encode(tone(2.0), loss_percent=10)  # 100 real 20 ms Opus packets with FEC


class ManualClock:
    """The event loop methods the receiver uses, on simulated time."""

    def __init__(self):
        self.now = 0.0
        self._timers: list = []
        self._ids = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback):
        handle = _Handle(when, next(self._ids), callback)
        heapq.heappush(self._timers, handle)
        return handle

    def call_soon(self, callback):
        """The next loop turn: at the same time, after what is already due."""
        return self.call_at(self.now, callback)

    def advance_to(self, when: float) -> None:
        while self._timers and self._timers[0].when <= when:
            handle = heapq.heappop(self._timers)
            if not handle.cancelled:
                self.now = max(self.now, handle.when)
                handle.callback()
        self.now = max(self.now, when)

    def stall_until(self, when: float) -> None:
        """The loop was held up until `when`: the timers due meanwhile fire now, late."""
        self.now = max(self.now, when)
        self.advance_to(when)

    @property
    def pending(self) -> int:
        return sum(not h.cancelled for h in self._timers)


class _Handle:
    def __init__(self, when, order, callback):
        self.when, self.order, self.callback, self.cancelled = when, order, callback, False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other) -> bool:
        return (self.when, self.order) < (other.when, other.order)


def receiver() -> tuple[AudioReceiver, list[np.ndarray], ManualClock]:
    clock = ManualClock()
    frames: list[np.ndarray] = []
    return AudioReceiver(frames.append, loop=clock), frames, clock


def check_frames(frames: list[np.ndarray]) -> None:
    for frame in frames:
        assert frame.shape == (1920,) and frame.dtype == np.float32
        assert np.isfinite(frame).all() and np.abs(frame).max() <= 1.0


def test_a_clean_stream_comes_out_whole_and_in_time():
    rx, frames, clock = receiver()
    for i, payload in enumerate(PACKETS):
        clock.advance_to(0.02 * i + 0.01)
        rx.on_packet(1, i, 960 * i, payload)
    clock.advance_to(3.0)
    check_frames(frames)
    stats = rx.stats
    assert stats.played == len(PACKETS) and stats.bad_packets == 0
    assert len(frames) == (stats.played + stats.lost) * 480 // 1920  # 20 ms per slot, nothing more
    assert stats.lost == 5  # after the last packet: 100 ms concealed, then a pause
    assert clock.pending == 0  # paused: the clock does not tick for a caller who stopped


def test_packets_that_carry_fec_are_counted_and_a_lost_one_is_restored_from_its_successor():
    plain = encode(tone(1.0), fec=False)
    for payloads in (PACKETS, plain):
        rx, frames, clock = receiver()
        # lose a packet whose successor carries FEC for it (libopus puts FEC in some packets only), if any
        lost = next((i for i in range(10, len(payloads) - 1) if rx.decoder.has_fec(payloads[i + 1])), 30)
        for i, payload in enumerate(payloads):
            clock.advance_to(0.02 * i + 0.01)
            if i != lost:
                rx.on_packet(1, i, 960 * i, payload)
        stats = rx.stats
        assert stats.fec_packets == sum(rx.decoder.has_fec(p) for i, p in enumerate(payloads) if i != lost)
        assert stats.lost == 1
        if payloads is PACKETS:  # what the bench reads to tell that a caller sends FEC at all
            assert stats.fec_packets > 0 and stats.recovered == 1 and stats.concealed_ms == 0
        else:
            assert stats.fec_packets == 0 and stats.recovered == 0 and stats.concealed_ms == 20


def test_a_stall_of_the_servers_own_loop_loses_none_of_the_packets_it_held_up():
    """The loop is held up 300 ms; the caller's packets of that time wait in the socket. The slot timer fires
    first, late (aiortc takes several loop turns per packet), and then the backlog is read: the held-up
    packets play in their slots; a packet really lost meanwhile is still concealed, and only it."""
    for really_lost in (None, 55):
        rx, frames, clock = receiver()
        for i, payload in enumerate(PACKETS):
            arrival = 0.02 * i + 0.01
            if i == 50:
                clock.stall_until(0.02 * 65 + 0.01)  # packets 50-64 were sent meanwhile
            if i >= 50:
                arrival = max(arrival, clock.now)
            clock.advance_to(arrival)
            if i != really_lost:
                rx.on_packet(1, i, 960 * i, payload)
        clock.advance_to(3.0)
        check_frames(frames)
        stats = rx.stats
        assert stats.loop_stalls >= 1 and stats.loop_stalled_ms >= 200
        assert stats.late == 0
        assert stats.lost - 5 == (0 if really_lost is None else 1)  # 5: the end of the stream, as always
        assert stats.played == len(PACKETS) - (really_lost is not None)
        assert len(frames) == (stats.played + stats.lost) * 480 // 1920


def test_a_stall_while_a_missing_slot_waits_its_loop_turns_is_a_stall_too():
    """Packet 50 is not there when its slot falls due, so the slot waits a loop turn for it, with no slot
    timer set; then the loop is held up 300 ms. The grace turn, due in the very next turn, runs 300 ms late:
    that is a stall like a late timer, counted and held back, and the packets of that time play in their
    slots. (Without it: 15 slots concealed, their packets dropped as late.)"""
    rx, frames, clock = receiver()
    for i, payload in enumerate(PACKETS[:50]):
        clock.advance_to(0.02 * i + 0.01)
        rx.on_packet(1, i, 960 * i, payload)
    while rx.stats.played < 50:
        clock.advance_to(rx.buffer.due_at())
    due = rx.buffer.due_at()  # slot 50's; its slot timer is set and fires first at `due`

    def stall():  # runs after that timer, before the grace turn it asks for
        clock.now = due + 0.3

    clock.call_at(due, stall)
    clock.advance_to(due)
    assert rx.stats.lost == 0 and rx.stats.loop_stalls == 1
    for i, payload in enumerate(PACKETS[50:], start=50):
        clock.advance_to(max(0.02 * i + 0.01, clock.now))
        rx.on_packet(1, i, 960 * i, payload)
    clock.advance_to(3.0)
    stats = rx.stats
    assert stats.loop_stalls == 1 and 290 <= stats.loop_stalled_ms <= 310
    assert stats.late == 0 and stats.lost == 5  # 5: the end of the stream, as always
    assert stats.played == len(PACKETS)


def test_a_packet_read_in_the_turn_its_slot_falls_due_is_played_not_concealed():
    """Packet 50 reaches the socket as its slot falls due: asyncio runs the slot timer in that turn, and aiortc
    hands us the packet a turn later. The slot waits a few loop turns (each reads pending I/O first) before it
    calls the packet lost."""
    rx, frames, clock = receiver()
    for i, payload in enumerate(PACKETS):
        arrival = 0.02 * i + 0.01
        if i == 50:
            while rx.stats.played < 50:  # slots up to 49 are played; slot 50's timer is set
                clock.advance_to(rx.buffer.due_at())
            due = rx.buffer.due_at()
            clock.call_at(due, lambda payload=payload: rx.on_packet(1, 50, 960 * 50, payload))  # after the timer
            clock.advance_to(due)
            continue
        clock.advance_to(max(arrival, clock.now))
        rx.on_packet(1, i, 960 * i, payload)
    clock.advance_to(3.0)
    stats = rx.stats
    assert stats.loop_stalls == 0  # no timer was late: nothing held back
    assert stats.late == 0 and stats.lost == 5  # 5: the end of the stream, as always
    assert stats.played == len(PACKETS)


def test_a_timer_on_time_holds_nothing_back():
    rx, frames, clock = receiver()
    for i, payload in enumerate(PACKETS):
        clock.advance_to(0.02 * i + 0.01)
        rx.on_packet(1, i, 960 * i, payload)
    assert rx.stats.loop_stalls == 0
    assert len(frames) >= (len(PACKETS) - 3) * 480 // 1920  # every frame whose packets are due is out


def test_garbage_and_truncated_packets_are_counted_and_their_slots_concealed():
    rx, frames, clock = receiver()
    for i, payload in enumerate(PACKETS):
        clock.advance_to(0.02 * i + 0.01)
        if i in (20, 40):
            payload = b"\xff\xff\xff"  # an invalid Opus packet
        elif i == 60:
            payload = payload[:2]  # truncated
        elif i == 70:
            payload = b""
        rx.on_packet(1, i, 960 * i, payload)
    clock.advance_to(2.5)
    check_frames(frames)
    stats = rx.stats
    assert stats.bad_packets + stats.decode_errors >= 3 and stats.concealed_ms >= 60  # a truncated one may decode
    assert len(frames) == (stats.played + stats.lost) * 480 // 1920


def test_the_receiver_closes_cleanly_and_ignores_late_packets_after():
    rx, frames, clock = receiver()
    rx.on_packet(1, 0, 0, PACKETS[0])
    rx.close()
    rx.on_packet(1, 1, 960, PACKETS[1])
    clock.advance_to(1.0)
    assert frames == [] and clock.pending == 0


opus_or_garbage = st.one_of(st.sampled_from(PACKETS), st.binary(max_size=60))


@st.composite
def rtp_streams(draw):
    """Packets with jumps, wraps, SSRC changes, duplicates and reordering, and the time each arrives."""
    count = draw(st.integers(1, 100))
    seq, ts, ssrc, now = draw(st.integers(0, 65535)), draw(st.integers(0, 2**32 - 1)), 1, 0.0
    packets = []
    for _ in range(count):
        move = draw(st.sampled_from(["next"] * 8 + ["jump_seq", "jump_ts", "ssrc", "dup", "back", "wrap"]))
        if move == "next":
            seq, ts = (seq + 1) % 65536, (ts + 960) % 2**32
        elif move == "jump_seq":
            seq = (seq + draw(st.integers(2, 40000))) % 65536
        elif move == "jump_ts":
            ts = (ts + draw(st.integers(961, 2**31))) % 2**32
        elif move == "ssrc":
            ssrc = draw(st.integers(0, 2**32 - 1))
        elif move == "back":
            seq, ts = (seq - draw(st.integers(1, 30))) % 65536, (ts - 960 * draw(st.integers(1, 30))) % 2**32
        elif move == "wrap":
            seq, ts = 65530, 2**32 - 3000
        now += draw(st.sampled_from([0.0, 0.005, 0.02, 0.02, 0.02, 0.05, 0.3]))
        packets.append((now, ssrc, seq, ts, draw(opus_or_garbage)))
    return packets


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(stream=rtp_streams())
def test_no_packet_sequence_breaks_the_receive_path(stream):
    rx, frames, clock = receiver()
    for now, ssrc, seq, ts, payload in stream:
        clock.advance_to(now)
        rx.on_packet(ssrc, seq, ts, payload)  # never raises
        assert rx.buffer.packets_held <= rx.buffer.capacity
    clock.advance_to(stream[-1][0] + 5.0)
    check_frames(frames)
    assert clock.pending <= 1
    stats = rx.stats
    assert stats.packets == len(stream)
    accounted = stats.played + stats.bad_packets + stats.late + stats.duplicates + rx.buffer.stats.discarded
    assert accounted <= stats.packets  # every packet is played or counted as what it was (or restarted away)


def test_a_flood_of_reordered_packets_stays_bounded():
    rx, frames, clock = receiver()
    rng = random.Random(3)
    order = list(range(2000))
    rng.shuffle(order)
    for n, i in enumerate(order):
        clock.advance_to(0.001 * n)
        rx.on_packet(7, i % 65536, 960 * i, PACKETS[i % len(PACKETS)])
        assert rx.buffer.packets_held <= rx.buffer.capacity
    clock.advance_to(10.0)
    check_frames(frames)
    stats = rx.stats
    assert stats.packets == 2000 and stats.late + stats.restarts + rx.buffer.stats.discarded > 0
