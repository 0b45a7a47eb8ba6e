"""The adaptive jitter buffer on simulated networks: delay follows jitter, losses never stall it.

A sender emits a 20 ms packet every 20 ms; each packet's network delay (or
loss) is chosen per test; the receiver asks the buffer every millisecond.
Times are simulated, so nothing here depends on the machine's speed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from server.media.jitter_buffer import Conceal, JitterBuffer, Play, Recover, Silence

TICKS = 960  # 20 ms at 48 kHz
PACKET_S = 0.02


@dataclass
class Sent:
    seq: int
    ts: int
    send_at: float
    payload: bytes


def packets(count: int, seq0: int = 1000, ts0: int = 5000, start: float = 0.0) -> list[Sent]:
    return [Sent((seq0 + i) % 65536, (ts0 + i * TICKS) % 2**32, start + i * PACKET_S, b"p%d" % i)
            for i in range(count)]


@dataclass
class Outcome:
    slots: list[tuple[float, object]]  # (time popped, slot)
    played_at: dict[bytes, float]  # payload -> time it was played
    arrived_at: dict[bytes, float]
    buffer: JitterBuffer

    def kinds(self) -> list[str]:
        return [type(slot).__name__ for _, slot in self.slots]

    def ticks(self) -> int:
        return sum(slot.ticks for _, slot in self.slots)

    def wait_ms(self, payload: bytes) -> float:
        return 1000 * (self.played_at[payload] - self.arrived_at[payload])


def simulate(sent: list[Sent], delay=lambda i: 0.03, lost=(), until: float | None = None, fec: bool = False,
             buffer: JitterBuffer | None = None, ssrc=lambda i: 1, probes: dict | None = None) -> Outcome:
    """`probes`: {time: None}, filled with the buffer's target delay at those times."""
    buffer = buffer or JitterBuffer()
    arrivals = sorted((p.send_at + delay(i), i, p) for i, p in enumerate(sent) if i not in lost)
    end = until if until is not None else max(a for a, _, _ in arrivals) + 0.5
    slots, played_at, arrived_at = [], {}, {}
    k = 0
    for ms in range(int(end * 1000) + 1):
        now = ms / 1000
        if until is None and k == len(arrivals) and buffer.packets_held == 0:
            break  # every packet is in and out: past here the buffer would conceal the sender's silence
        if probes is not None and ms in probes:
            probes[ms] = buffer.target_s
        while k < len(arrivals) and arrivals[k][0] <= now:
            at, i, p = arrivals[k]
            buffer.add(p.seq, p.ts, p.payload, at, ssrc=ssrc(i), ticks=TICKS, has_fec=fec)
            arrived_at[p.payload] = at
            k += 1
        while (slot := buffer.pop(now)) is not None:
            slots.append((now, slot))
            if isinstance(slot, Play):
                played_at[slot.payload] = now
    return Outcome(slots, played_at, arrived_at, buffer)


def test_a_clean_link_plays_everything_in_order_at_once():
    out = simulate(packets(200))
    assert out.kinds() == ["Play"] * 200
    assert [slot.payload for _, slot in out.slots] == [p.payload for p in packets(200)]
    assert out.buffer.target_s == pytest.approx(0.02)  # one packet: no jitter to absorb, no FEC to wait for
    # After the first half second (which starts from 40 ms, the jitter unknown), packets wait no longer.
    assert max(out.wait_ms(p.payload) for p in packets(200)[30:]) <= 1000 * out.buffer.target_s + 1
    assert out.buffer.stats.lost == 0 and out.buffer.stats.late == 0


def test_one_lost_packet_is_concealed_on_time_and_leaves_no_lasting_delay():
    out = simulate(packets(300), lost={100})
    kinds = out.kinds()
    # The next packet is due when the slot's time is up: it is offered for FEC (the decoder conceals when
    # it carries none).
    assert kinds[100] in ("Recover", "Conceal") and kinds.count("Play") == 299 and len(kinds) == 300
    assert out.ticks() == 300 * TICKS  # media time continuous: exactly 20 ms per 20 ms of RTP time
    before = [out.wait_ms(p.payload) for p in packets(300)[50:100]]
    after = [out.wait_ms(p.payload) for p in packets(300)[101:]]
    assert max(after) <= max(before) + 1  # unlike a fixed buffer that stays deep for the rest of the call
    # The loss was decided one target after the packet was due, not when some buffer filled.
    conceal_time = out.slots[100][0]
    assert conceal_time <= packets(300)[100].send_at + 0.03 + out.buffer.target_s + 0.002


def test_with_fec_a_loss_waits_one_packet_and_is_recovered_from_the_next():
    out = simulate(packets(200), lost={80}, fec=True)
    assert out.kinds()[80] == "Recover"
    assert out.slots[80][1].next_payload == packets(200)[81].payload
    assert out.kinds()[81] == "Play" and out.ticks() == 200 * TICKS
    assert 0.02 <= out.buffer.target_s < 0.03  # one packet of lookahead (it covers the floor), no jitter


def test_the_target_grows_with_jitter_and_shrinks_back_when_it_calms():
    rng = random.Random(7)
    jitter = [rng.uniform(0, 0.04) if 100 <= i < 400 else 0.0 for i in range(900)]
    probes = {1900: None, 7900: None, 17900: None}  # ms: clean, after 6 s of jitter, 10 s after it ended
    out = simulate(packets(900), delay=lambda i: 0.03 + jitter[i], probes=probes)
    clean, jittery, calm = probes.values()
    assert clean == pytest.approx(0.02)
    assert 0.035 <= jittery <= 0.05  # about the jitter's spread, 40 ms
    assert calm == pytest.approx(0.02)  # back to one packet a few seconds after the jitter stopped
    assert out.buffer.stats.lost <= 3  # the jitter was absorbed, not concealed
    assert out.ticks() == 900 * TICKS


def test_reordered_packets_within_the_target_are_played_in_order():
    # Packets 50 and 51 swap places (51 arrives 5 ms before 50); a little jitter keeps a target.
    def delay(i):
        return {50: 0.048, 51: 0.023}.get(i, 0.03 + 0.02 * (i % 2))

    out = simulate(packets(120), delay=delay)
    assert out.kinds() == ["Play"] * 120
    assert [slot.payload for _, slot in out.slots] == [p.payload for p in packets(120)]


def test_a_packet_after_its_slot_was_concealed_is_dropped_and_counted():
    out = simulate(packets(100), delay=lambda i: 0.5 if i == 40 else 0.03)
    assert out.kinds()[40] == "Conceal"
    assert out.buffer.stats.late == 1 and out.buffer.stats.lost == 1
    assert packets(100)[40].payload not in out.played_at
    assert out.ticks() == 100 * TICKS


def test_a_long_outage_is_concealed_briefly_then_pauses_and_the_stream_resumes_from_its_new_packets():
    out = simulate(packets(200), lost=set(range(50, 100)))
    kinds = out.kinds()
    assert kinds[50:55] == ["Conceal"] * 5  # 100 ms of concealment: past that it would only fade
    assert kinds[55:] == ["Play"] * 100  # nothing made up while paused; then on from packet 100
    assert out.buffer.stats.pauses == 1 and out.buffer.stats.lost == 5
    assert out.ticks() == 155 * TICKS
    # A sender that simply stops costs 100 ms of concealment, then nothing.
    stopped = simulate(packets(60), until=3.0)
    assert stopped.kinds() == ["Play"] * 60 + ["Conceal"] * 5


def test_sequence_and_timestamp_wrap_around():
    out = simulate(packets(100, seq0=65500, ts0=2**32 - 20 * TICKS))
    assert out.kinds() == ["Play"] * 100 and out.ticks() == 100 * TICKS


def test_a_gap_the_sender_leaves_in_rtp_time_becomes_silence():
    sent = packets(60)
    # Discontinuous transmission: after packet 29 the sender is quiet for 400 ms (20 packets' time),
    # then goes on with the next sequence number.
    gap = [Sent(p.seq, (p.ts + 20 * TICKS) % 2**32, p.send_at + 0.4, p.payload) for p in sent[30:]]
    out = simulate(sent[:30] + gap)
    played = [slot.payload for _, slot in out.slots if isinstance(slot, Play)]
    assert played == [p.payload for p in sent]
    assert out.ticks() == 80 * TICKS  # 60 packets and the 20-packet gap: media time follows RTP time


def test_a_new_ssrc_or_a_far_jump_restarts_the_stream():
    first = packets(50)
    second = packets(50, seq0=30000, ts0=123456, start=1.1)
    out = simulate(first + second, ssrc=lambda i: 1 if i < 50 else 2)
    assert out.buffer.stats.restarts == 1
    assert out.kinds().count("Play") == 100
    jump = simulate(first + packets(50, seq0=5000, ts0=10**6, start=1.1))
    assert jump.buffer.stats.restarts == 1 and jump.kinds().count("Play") == 100


def test_duplicates_and_floods_are_counted_and_memory_stays_bounded():
    buffer = JitterBuffer(capacity=64)
    for i in range(10):
        buffer.add(100, 0, b"same", arrival=0.001 * i)
    assert buffer.stats.duplicates == 9 and buffer.packets_held == 1
    for i in range(1, 500):  # far ahead of what is being played: never more than `capacity` held
        buffer.add(100 + i, i * TICKS, b"x", arrival=0.01)
    assert buffer.packets_held <= 64
    assert buffer.stats.discarded > 0


@pytest.mark.parametrize("seed", range(5))
def test_any_mix_of_loss_jitter_and_reordering_keeps_media_time_exact(seed):
    rng = random.Random(seed)
    count = 400
    lost = {i for i in range(5, count) if rng.random() < 0.1}
    delays = [0.03 if i < 5 else 0.03 + rng.uniform(0, 0.06) for i in range(count)]
    out = simulate(packets(count), delay=lambda i: delays[i], lost=lost)
    played = [slot.payload for _, slot in out.slots if isinstance(slot, Play)]
    expected = [p.payload for i, p in enumerate(packets(count)) if p.payload in played]
    assert played == expected  # never out of order
    assert out.ticks() == count * TICKS
    assert all(isinstance(slot, (Play, Recover, Conceal, Silence)) for _, slot in out.slots)
    stats = out.buffer.stats
    assert stats.played + stats.lost == count and stats.pauses == 0


def test_delay_figures_match_a_scan_of_the_window():
    """The fastest transit and the spread come from kept-sorted structures; they must equal a plain scan of
    the window (the figures the buffer's timing rests on), for bursty arrivals, equal times and ties."""
    from server.media.jitter_buffer import _Delays

    rng = random.Random(7)
    for window_s, attack_s in ((4.0, 1.0), (0.3, 1.0), (1.0, 1.0)):
        delays = _Delays(window_s, attack_s)
        kept: list[tuple[float, float]] = []
        arrival = 0.0
        for i in range(3000):
            arrival += rng.choice((0.0, 0.001, 0.02, 0.02, 0.02, 0.05, 0.3))
            transit = rng.choice((0.5, 0.5 + rng.random() * 0.2, 0.5 - rng.random() * 0.01, 0.51))
            delays.add(arrival, transit)
            kept = [(a, t) for a, t in [*kept, (arrival, transit)] if a >= arrival - window_s]
            fastest = min(t for _, t in kept)
            excess = sorted(t - fastest for _, t in kept)
            recent = max(t - fastest for a, t in kept if a >= arrival - attack_s)
            expected = max(recent, excess[min(len(excess) - 1, int(0.95 * len(excess)))])
            assert delays.fastest() == fastest
            assert delays.spread(0.95, fastest) == expected
            assert len(delays.samples) == len(kept)
            if i == 1500:
                delays.clear()
                kept = []
