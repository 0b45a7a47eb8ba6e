"""Inbound audio: any decoded frame to exact engine frames of float32 mono 24 kHz.

aiortc's Opus decoder hands out packed s16 stereo 48 kHz frames of 20 ms, but
nothing here assumes it: every frame goes through PyAV's resampler, whatever
its format, layout and rate, and a new resampler is made when those change
mid-call. The output is cut into exact engine frames (1920 samples, 80 ms).
int16 never reaches the engine: the resampler converts to float in [-1, 1].
A float source can carry NaN, infinities or samples past full scale: they
become silence and are clipped here (counted), so nothing but finite samples
in [-1, 1] reaches the model.

Channels are averaged here rather than by the resampler: FFmpeg's stereo to
mono downmix sums the channels at -3 dB each, so the identical-channel stereo
that aiortc produces would reach the model 3 dB hotter than it was spoken.
"""

from __future__ import annotations

import av
import numpy as np


class InboundAudio:
    """Feed decoded `av.AudioFrame`s in; take exact float32 mono frames out."""

    def __init__(self, sample_rate: int = 24000, frame_size: int = 1920):
        self.sample_rate = sample_rate
        self.frame_size = frame_size
        self._resampler: av.AudioResampler | None = None
        self._source: tuple[str, str, int] | None = None
        self._frame = np.zeros(frame_size, dtype=np.float32)  # the engine frame being filled
        self._filled = 0
        self.samples_repaired = 0  # NaN, infinite or past full scale, as sent

    def _resampler_for(self, frame: av.AudioFrame) -> av.AudioResampler:
        source = (frame.format.name, frame.layout.name, frame.sample_rate)
        if self._resampler is None or source != self._source:
            self._resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=self.sample_rate)
            self._source = source
        return self._resampler

    def push(self, frame: av.AudioFrame) -> list[np.ndarray]:
        """Resample one frame; return the whole engine frames now complete (often none)."""
        frames: list[np.ndarray] = []
        for out in self._resampler_for(frame).resample(frame):
            frames += self._cut(self._repaired(_mono(out.to_ndarray())))  # [channels, samples], planar float
        return frames

    def push_samples(self, samples: np.ndarray) -> list[np.ndarray]:
        """Float mono samples already at `sample_rate` (the Opus receive path decodes to it); whole frames."""
        return self._cut(self._repaired(samples.astype(np.float32, copy=False)))

    def _cut(self, samples: np.ndarray) -> list[np.ndarray]:
        """Copy `samples` into the frame being filled; each frame they complete, as its own array."""
        frames: list[np.ndarray] = []
        start, count = 0, len(samples)
        while start < count:
            n = min(count - start, self.frame_size - self._filled)
            self._frame[self._filled : self._filled + n] = samples[start : start + n]
            self._filled += n
            start += n
            if self._filled == self.frame_size:
                frames.append(self._frame.copy())
                self._filled = 0
        return frames

    def _repaired(self, samples: np.ndarray) -> np.ndarray:
        if len(samples) == 0 or (_largest(samples) <= 1.0 and _smallest(samples) >= -1.0):  # NaN fails these
            return samples
        bad = ~np.isfinite(samples) | (np.abs(samples) > 1.0)
        if not bad.any():
            return samples
        self.samples_repaired += int(bad.sum())
        return np.clip(np.nan_to_num(samples, nan=0.0, posinf=0.0, neginf=0.0), -1.0, 1.0).astype(np.float32)

    @property
    def buffered_samples(self) -> int:
        return self._filled

    def flush(self) -> np.ndarray:
        """Everything left: the resampler's tail and the samples after the last whole frame (for files)."""
        pieces = [self._frame[: self._filled].copy()]
        if self._resampler is not None:
            for out in self._resampler.resample(None):
                pieces.append(self._repaired(_mono(out.to_ndarray())))
        self._filled = 0
        return np.concatenate(pieces)


_largest, _smallest = np.maximum.reduce, np.minimum.reduce  # a NaN anywhere makes both NaN


def _mono(planes: np.ndarray) -> np.ndarray:
    """Average the channels; NaN and infinities pass quietly here and are repaired after."""
    if planes.shape[0] == 1 or planes.shape[1] == 0:
        return planes[0].astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        return planes.mean(axis=0, dtype=np.float32)


def read_audio_file(path: str, sample_rate: int = 24000) -> np.ndarray:
    """Decode any audio file PyAV reads to float32 mono at `sample_rate`, the same way calls are resampled."""
    inbound = InboundAudio(sample_rate=sample_rate, frame_size=sample_rate)
    pieces: list[np.ndarray] = []
    with av.open(path) as container:
        if not container.streams.audio:
            raise ValueError(f"{path} has no audio stream")
        for frame in container.decode(audio=0):
            pieces += inbound.push(frame)
    pieces.append(inbound.flush())
    return np.concatenate(pieces).astype(np.float32)
