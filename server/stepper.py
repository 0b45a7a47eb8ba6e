"""What the engine's inference thread drives: a batched, slot-aware step.

A stepper owns the model objects and their streaming state for B call slots.
The engine calls it only from its inference thread: `reset_slots` when a call
takes a slot, `step` with one frame for each slot that has one ready. Slots
that are not in `rows` must be left exactly as they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class ModelInfo:
    """What logs and clients are told about the model behind the engine."""

    name: str
    is_test_model: bool
    kind: str  # "moshi" or "echo"
    notice: str | None = None
    layout: str = ""


@dataclass
class SlotOutput:
    """One slot's result for one step. `audio` is None when the model has no audio yet (silence)."""

    audio: np.ndarray | None = None
    text: str | None = None
    error: Exception | None = None


class Stepper(Protocol):
    batch_size: int
    frame_size: int
    sample_rate: int
    info: ModelInfo

    def reset_slots(self, slots: list[int], seeds: list[int]) -> None: ...

    def step(self, frames: np.ndarray, rows: np.ndarray) -> list[SlotOutput]:
        """`frames` is [B, frame_size] float32; `rows[b]` is True where slot b has a frame."""
        ...

    def warm_up(self) -> None: ...
