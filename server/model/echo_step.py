"""The `echo` engine: no model, each caller's audio handed back through the same slots.

It keeps the engine's frame structure (1920-sample frames at 24 kHz, one
output frame per input frame, B slots, the inference thread) and Moshi's
structural delay of one frame, so a network path and its latency can be
tested without a GPU or weights. The first output frame of a call is silence,
as with the real model whose first frame is dropped.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from .stepper import ModelInfo, NoPrompts, SlotOutput

ECHO_NAME = "echo"


class EchoStepper(NoPrompts):
    def __init__(self, batch_size: int, frame_size: int = 1920, sample_rate: int = 24000, delay_frames: int = 1):
        if delay_frames < 0:
            raise ValueError("delay_frames must be >= 0")
        self.batch_size = batch_size
        self.frame_size = frame_size
        self.sample_rate = sample_rate
        self.delay_frames = delay_frames
        self.info = ModelInfo(
            name=ECHO_NAME,
            is_test_model=True,
            kind="echo",
            notice="DIAGNOSTICS: the echo engine runs no model; it sends your own audio back.",
            layout=f"frame_size={frame_size} sample_rate={sample_rate} delay_frames={delay_frames}",
        )
        self._lines: list[deque[np.ndarray | None]] = [deque() for _ in range(batch_size)]

    def reset_slots(self, slots: list[int], seeds: list[int]) -> None:
        for slot in slots:
            self._lines[slot] = deque([None] * self.delay_frames)

    def step(self, frames: np.ndarray, rows: np.ndarray, prompts: np.ndarray | None = None) -> list[SlotOutput]:
        outputs = [SlotOutput() for _ in range(self.batch_size)]
        for slot in np.flatnonzero(rows):
            line = self._lines[slot]
            line.append(frames[slot].copy())
            outputs[slot].audio = line.popleft()
        return outputs

    def warm_up(self) -> None:
        self.reset_slots(list(range(self.batch_size)), [0] * self.batch_size)
