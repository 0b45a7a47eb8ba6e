"""The outbound track: paced by the wall clock, pts by samples, silence when idle, bounded buffer."""

from __future__ import annotations

import time

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from server.audio_out import OutboundAudioTrack


async def test_frames_follow_the_wall_clock_over_five_seconds_with_pts_in_20ms_steps():
    track = OutboundAudioTrack(max_buffer_ms=3000)
    track.push(np.full(24000 * 2, 0.25, dtype=np.float32))  # 2 s of audio, then silence
    start = time.monotonic()
    pts, lags = [], []
    while time.monotonic() - start < 5.0:
        frame = await track.recv()
        elapsed = time.monotonic() - start
        pts.append(frame.pts)
        lags.append(len(pts) - 1 - elapsed / 0.020)  # frames sent ahead of the clock
    assert max(abs(lag) for lag in lags) <= 2
    assert abs(len(pts) - 5.0 / 0.020) <= 2
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
