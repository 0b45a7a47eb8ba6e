"""What the engine's inference thread drives: a batched, slot-aware step.

A stepper owns the model objects and their streaming state for B call slots.
The engine calls it only from its inference thread: `reset_slots` when a call
takes a slot, `step` with one frame for each slot that has one ready. Slots
that are not in `rows` must be left exactly as they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

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

    def step(self, frames: np.ndarray, rows: np.ndarray, prompts: np.ndarray | None = None) -> list[SlotOutput]:
        """`frames` is [B, frame_size] float32; `rows[b]` is True where slot b has a frame.
        Slots replaying a prompt advance one prompt step too (only those in `prompts`, when given)."""
        ...

    def warm_up(self) -> None: ...

    # Persona prompts (see server.model.persona): models that take none inherit NoPrompts.
    prompt_book: Any

    def start_prompt(self, slot: int, plan: Any) -> None: ...

    def end_prompt(self, slot: int) -> None: ...

    def prompting_rows(self) -> np.ndarray:
        """[B] bool: slots replaying a prompt. Their frames are not stepped; `step` advances them itself."""
        ...


class NoPrompts:
    """For steppers whose model takes no persona: nothing to replay, ever."""

    batch_size: int
    prompt_book = None

    def start_prompt(self, slot: int, plan: Any) -> None:
        raise ValueError("this model takes no persona prompt")

    def end_prompt(self, slot: int) -> None:
        pass

    def prompting_rows(self) -> np.ndarray:
        return np.zeros(self.batch_size, dtype=bool)
