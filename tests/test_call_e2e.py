"""Real calls on loopback: an aiortc caller, real Opus, PyAV, the signaling app and the engine."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tone_frames

from server.caller import place_call


def dbfs(samples: np.ndarray) -> float:
    return 20 * np.log10(np.sqrt(np.mean(samples.astype(np.float64) ** 2)) + 1e-12)


def tone(hz: float, seconds: float, dbfs_level: float = -20.0, rate: int = 48000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (10 ** (dbfs_level / 20) * np.sqrt(2) * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def speechlike(seconds: float, rate: int = 48000, seed: int = 0) -> np.ndarray:
    """Noise shaped by a syllable-rate envelope: something with energy and variety."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return (0.1 * envelope * rng.standard_normal(t.size)).astype(np.float32)


async def test_a_call_with_the_tiny_model_answers_with_audio_and_text(tiny_server):
    seconds = 3.0
    # The caller stops sending when its audio is out, so the reply is exactly the answer to it.
    recording = await place_call(tiny_server.url, speechlike(seconds), tail_s=0.6, silence_after=False)
    reply = recording.audio
    assert recording.events[0]["type"] == "ready" and recording.events[0]["test_model"] is True
    assert "babbles" in recording.events[0]["notice"]
    assert dbfs(reply[reply != 0]) > -35  # well above silence
    voiced_chunks = [c for c in recording.chunks if np.abs(c).max() > 1e-3]  # 20 ms each
    # One reply frame per input frame: the first two are silent (dropped frame, model delay). When the
    # caller stops, the receive path conceals 100 ms (it cannot tell a stop from a loss), then pauses.
    expected_chunks = round((seconds - 0.16 + 0.1) / 0.020)  # counted in 20 ms chunks: no float rounding
    assert abs(len(voiced_chunks) - expected_chunks) <= 8, len(voiced_chunks)
    assert len(recording.texts) >= 3 and recording.transcript.strip()
    assert not tiny_server.service.sessions and tiny_server.engine.free_slots == 2


async def test_echo_brings_a_tone_back_at_its_level_and_pitch(echo_server):
    recording = await place_call(echo_server.url, tone(440, 3.0, -20.0), tail_s=0.5)
    reply = recording.audio
    voiced = np.flatnonzero(np.abs(reply) > 0.02)
    assert voiced.size > 24000
    steady = reply[voiced[0] + 4800 : voiced[-1] - 4800]  # the tone's middle, away from codec edges
    assert dbfs(steady) == pytest.approx(-20.0, abs=2.0)
    spectrum = np.abs(np.fft.rfft(steady * np.hanning(steady.size)))
    assert np.fft.rfftfreq(steady.size, 1 / 24000)[np.argmax(spectrum)] == pytest.approx(440.0, abs=5.0)


def test_tone_helper_level():
    assert dbfs(tone_frames(440, 10)[3]) == pytest.approx(-20, abs=0.1)
