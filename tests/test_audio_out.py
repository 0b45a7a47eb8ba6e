"""The outbound track: paced by the wall clock, pts by samples, silence when idle, bounded buffer."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from server.media.audio_out import OutboundAudioTrack, SendPhase


async def test_frames_never_run_ahead_of_the_wall_clock_and_pts_step_by_20ms():
    track = OutboundAudioTrack(max_buffer_ms=3000)
    track.push(np.full(24000 * 2, 0.25, dtype=np.float32))  # 2 s of audio, then silence
    start = time.monotonic()
    pts, lags = [], []
    while time.monotonic() - start < 5.0:
        frame = await track.recv()
        elapsed = time.monotonic() - start
        pts.append(frame.pts)
        lags.append(len(pts) - 1 - elapsed / 0.020)  # frames sent ahead of the clock
    assert max(lags) <= 2  # never ahead of the wall clock (a loaded machine may fall behind it)
    assert len(pts) <= 5.0 / 0.020 + 2
    assert np.all(np.diff(pts) == 480)
    assert track.silent_frames == pytest.approx(len(pts) - 100, abs=1)
    track.stop()
    with pytest.raises(MediaStreamError):
        await track.recv()


async def test_audio_comes_out_as_s16_stereo_at_its_level_then_silence():
    track = OutboundAudioTrack(max_buffer_ms=1000)
    track.push(np.full(480, 0.5, dtype=np.float32))
    first, second = await track.recv(), await track.recv()
    assert (first.format.name, first.layout.name, first.sample_rate, first.samples) == ("s16", "stereo", 24000, 480)
    assert np.all(first.to_ndarray() == int(0.5 * 32767))
    assert np.all(second.to_ndarray() == 0)
    assert (track.frames_sent, track.silent_frames) == (2, 1)


def test_a_backed_up_buffer_drops_the_oldest_and_counts_it():
    track = OutboundAudioTrack(max_buffer_ms=1000)
    for second in range(10):
        track.push(np.full(24000, second / 10, dtype=np.float32))
    assert track.buffered_samples == 24000
    assert track.samples_dropped == 9 * 24000
    assert np.all(track._take(480) == np.float32(0.9))  # what is left is the newest second


async def test_standing_delay_is_shed_after_a_second_and_new_audio_kept():
    track = OutboundAudioTrack(max_buffer_ms=2000, max_standing_ms=120)
    track.push(np.full(24000 // 2, 0.1, dtype=np.float32))  # a 500 ms burst after the model caught up
    for _ in range(55):  # 1.1 s of real-time play while the model keeps pace: 20 ms in, 20 ms out
        track.push(np.full(480, 0.2, dtype=np.float32))
        await track.recv()
    dropped_ms = 1000 * track.samples_dropped / 24000
    assert dropped_ms == pytest.approx(500 - 120, abs=30)
    assert 1000 * track.buffered_samples / 24000 <= 140
    assert np.all(track._take(480) == np.float32(0.2))  # what was kept is the newest audio


async def test_no_shedding_while_the_buffer_runs_low():
    track = OutboundAudioTrack(max_buffer_ms=2000, max_standing_ms=120)
    for i in range(60):
        if i % 4 == 0:
            track.push(np.full(1920, 0.2, dtype=np.float32))  # the engine's 80 ms frames
        await track.recv()
    assert track.samples_dropped == 0 and track.silent_frames == 0


def test_send_phase_moves_the_slots_earlier_only_when_every_frame_of_a_second_waited():
    phase = SendPhase(pushes_per_window=12, margin_s=0.003, max_step_s=0.01)
    assert [phase.on_push(0.008) for _ in range(11)] == [0.0] * 11
    assert phase.on_push(0.009) == pytest.approx(0.005)  # the least wait of the window, less the margin
    assert [phase.on_push(0.030) for _ in range(11)] + [phase.on_push(0.030)] == [0.0] * 11 + [0.01]  # capped
    steps = [phase.on_push(0.030 if i != 5 else 0.002) for i in range(12)]
    assert steps == [0.0] * 12  # one frame that arrived just in time holds the slots where they are
    assert phase.advanced_s == pytest.approx(0.015)


def test_a_late_frame_restarts_the_send_phase_window():
    phase = SendPhase(pushes_per_window=4)
    for _ in range(3):
        phase.on_push(0.02)
    phase.on_late(0.004)
    assert [phase.on_push(0.02) for _ in range(3)] == [0.0] * 3  # the window started again
    assert phase.on_push(0.02) > 0 and phase.delayed_s == pytest.approx(0.004)


@pytest.mark.parametrize("aligned", [True, False])
async def test_a_frame_late_for_its_slot_is_waited_for_when_aligned_not_replaced_by_silence(aligned):
    track = OutboundAudioTrack(max_buffer_ms=1000, align_to_pushes=aligned)
    if aligned:
        track.phase = SendPhase(grace_s=30.0)  # so long that a loaded machine cannot miss it
    track.push(np.full(1920, 0.25, dtype=np.float32))  # an engine frame: four 20 ms slots
    sent = [await track.recv() for _ in range(4)]
    late = asyncio.get_running_loop().call_later(0.03, track.push, np.full(1920, 0.5, dtype=np.float32))
    fifth = await track.recv()  # due 20 ms after the fourth, before the late frame is pushed
    late.cancel()
    pts = [frame.pts for frame in [*sent, fifth]]
    assert np.all(np.diff(pts) == 480)  # media time stays continuous either way
    if aligned:
        assert np.all(fifth.to_ndarray() == int(0.5 * 32767)) and track.silent_frames == 0
        assert track.phase.delayed_s > 0
    else:
        assert np.all(fifth.to_ndarray() == 0) and track.silent_frames == 1
