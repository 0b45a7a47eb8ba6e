"""The inbound resampler: level and pitch survive any rate, layout and sample format."""

from __future__ import annotations

import av
import numpy as np
import pytest

from server.audio.inbound import InboundAudio


def make_frames(rate: int, layout: str, fmt: str, hz: float = 440.0, dbfs: float = -20.0, seconds: float = 1.0):
    """20 ms av.AudioFrames of a sine at `dbfs` RMS, as a WebRTC decoder would hand them out."""
    channels = 2 if layout == "stereo" else 1
    amplitude = 10 ** (dbfs / 20) * np.sqrt(2)
    chunk = rate // 50
    t = np.arange(int(seconds * rate)) / rate
    wave = amplitude * np.sin(2 * np.pi * hz * t)
    frames, pts = [], 0
    for start in range(0, len(wave) - chunk + 1, chunk):
        mono = wave[start : start + chunk]
        samples = np.tile(mono, (channels, 1))  # [channels, n]
        is_int = fmt.startswith("s16")
        samples = np.round(samples * 32767).astype(np.int16) if is_int else samples.astype(np.float32)
        if not fmt.endswith("p"):  # packed: one row of interleaved samples
            samples = samples.T.reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format=fmt, layout=layout)
        frame.sample_rate = rate
        frame.pts = pts
        pts += chunk
        frames.append(frame)
    return frames


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


@pytest.mark.parametrize("rate", [8000, 16000, 24000, 44100, 48000])  # 24 kHz: the engine's own rate
@pytest.mark.parametrize("layout", ["mono", "stereo"])
@pytest.mark.parametrize("fmt", ["s16", "flt", "s16p", "fltp"])
def test_any_input_becomes_float32_mono_24k_at_the_same_level_and_pitch(rate, layout, fmt):
    inbound = InboundAudio()
    out = [f for frame in make_frames(rate, layout, fmt) for f in inbound.push(frame)]
    assert all(f.dtype == np.float32 and f.shape == (1920,) for f in out)
    audio = np.concatenate(out)
    # One second in: all but the resampler's small delay and the partial last frame comes out.
    assert 24000 - 2 * 1920 <= len(audio) + inbound.buffered_samples <= 24000
    steady = audio[1920:]  # skip the resampler's start-up
    level_dbfs = 20 * np.log10(np.sqrt(np.mean(steady.astype(np.float64) ** 2)))
    assert level_dbfs == pytest.approx(-20.0, abs=0.5)
    assert dominant_hz(steady, 24000) == pytest.approx(440.0, abs=3.0)
    assert np.abs(audio).max() <= 1.0


def test_a_format_change_mid_call_is_followed():
    inbound = InboundAudio()
    out = [f for frame in make_frames(48000, "stereo", "s16", seconds=0.5) for f in inbound.push(frame)]
    out += [f for frame in make_frames(16000, "mono", "flt", seconds=0.5) for f in inbound.push(frame)]
    audio = np.concatenate(out)
    assert len(audio) + inbound.buffered_samples >= 24000 - 3 * 1920
    level_dbfs = 20 * np.log10(np.sqrt(np.mean(audio[1920:].astype(np.float64) ** 2)))
    assert level_dbfs == pytest.approx(-20.0, abs=1.0)


def test_samples_are_framed_exactly_and_bad_ones_repaired_and_counted():
    """The receive path's framing: any push sizes, every sample once, in order; NaN, infinities and peaks
    past full scale become silence or are clipped, and each is counted once."""
    rng = np.random.default_rng(11)
    audio = (rng.standard_normal(24000) * 0.3).astype(np.float32)
    audio[[5, 700, 5000]] = [np.nan, np.inf, -np.inf]
    audio[[9, 10]] = [1.5, -3.0]
    expected = np.clip(np.nan_to_num(audio, nan=0.0, posinf=0.0, neginf=0.0), -1.0, 1.0)
    bad = int((~np.isfinite(audio) | (np.abs(audio) > 1.0)).sum())
    inbound = InboundAudio(frame_size=1920)
    frames, start = [], 0
    for size in rng.integers(0, 3000, size=100):
        frames += inbound.push_samples(audio[start : start + size])
        start += size
        if start >= len(audio):
            break
    assert all(f.shape == (1920,) and f.dtype == np.float32 for f in frames)
    out = np.concatenate(frames + [inbound.flush()])
    np.testing.assert_array_equal(out, expected[: len(out)])
    assert len(out) == min(start, len(audio))
    assert inbound.samples_repaired == bad
    frames[0][:] = 9.0  # handed-out frames are the caller's own: nothing inside the framer changes
    assert inbound.push_samples(np.zeros(1920, np.float32))[0].max() == 0.0
