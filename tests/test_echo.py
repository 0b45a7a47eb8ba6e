"""The echo engine: the caller's own audio back, one frame late, through the same slots."""

from __future__ import annotations

import numpy as np
from conftest import noise_frames, run_call, tone_frames

from server.engine.setup import create_engine
from server.model.source import ModelSource


async def test_echo_hands_back_each_callers_audio_one_frame_late():
    engine = create_engine(ModelSource("echo"), max_calls=2)
    await engine.start()
    assert engine.info.kind == "echo" and "no model" in engine.info.notice
    frames = tone_frames(440, 6, dbfs=-20)
    results = await run_call(engine, frames)
    assert results[0].silent and np.all(results[0].audio == 0)
    for sent, got in zip(frames[:-1], results[1:], strict=True):
        assert np.array_equal(sent, got.audio)
    # A second caller hears only itself: nothing of the first call's last frame.
    other = noise_frames(3, 3)
    second = await run_call(engine, other)
    assert second[0].silent and np.array_equal(second[1].audio, other[0])
    await engine.stop()
