"""Frames in and out of the engine: the input check every frame passes, and what a step returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# A float frame whose peak passes this is int16 audio stored as floats, not a loud frame.
_FLOAT_PCM_LIMIT = 2.0


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0


def check_frame(frame: Any, frame_size: int) -> np.ndarray:
    """Return the frame as float32 in [-1, 1], or raise saying what is wrong with it."""
    if not isinstance(frame, np.ndarray):
        raise TypeError(f"a frame must be a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.float32:
        raise TypeError(
            f"a frame must be float32 PCM in [-1, 1], got {frame.dtype}; "
            "convert int16 PCM with samples.astype(np.float32) / 32768"
        )
    if frame.shape != (frame_size,):
        raise ValueError(f"a frame must hold {frame_size} mono samples, got shape {frame.shape}")
    if not np.isfinite(frame).all():
        raise ValueError("a frame holds NaN or infinite samples")
    peak = float(np.abs(frame).max())
    if peak > _FLOAT_PCM_LIMIT:
        raise ValueError(
            f"a frame's peak is {peak:g}, far outside [-1, 1]: this looks like int16 samples "
            "stored as float; divide by 32768"
        )
    return np.clip(frame, -1.0, 1.0)


@dataclass
class FrameResult:
    """The model's answer to one input frame."""

    audio: np.ndarray  # float32, frame_size samples; zeros when the model had no audio yet
    text: str | None
    silent: bool
    input_rms: float
    output_rms: float
    step_ms: float  # duration of the batched step that produced this frame
    latency_ms: float  # from process() to the result


@dataclass
class CallStats:
    frames_in: int = 0
    frames_during_prompt: int = 0
    frames_out: int = 0
    frames_silent: int = 0
    frames_dropped: int = 0
    token_errors: int = 0
    text_pieces: int = 0
    last_input_rms: float = 0.0
    last_output_rms: float = 0.0
    input_rms_sum: float = 0.0
    step_ms_total: float = 0.0

    @property
    def mean_input_rms(self) -> float:
        """Mean RMS of the frames the caller sent: a level problem shows here at once."""
        return self.input_rms_sum / self.frames_in if self.frames_in else 0.0

    @property
    def mean_step_ms(self) -> float:
        return self.step_ms_total / self.frames_out if self.frames_out else 0.0

    def count_result(self, result: FrameResult) -> None:
        """Account for one frame the model answered (the engine's own calls and a worker's remote ones)."""
        self.frames_out += 1
        self.frames_silent += int(result.silent)
        self.text_pieces += int(result.text is not None)
        self.last_input_rms = result.input_rms
        self.last_output_rms = result.output_rms
        self.step_ms_total += result.step_ms


