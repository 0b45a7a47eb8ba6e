"""A caller's hold on a slot (`Call`), used on the event loop; the inference thread answers its frames."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..model.persona import PromptPlan
from ..model.stepper import SlotOutput
from .errors import CallClosed
from .frames import CallStats, FrameResult, check_frame, rms

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)


@dataclass
class PendingFrame:
    call: Call
    frame: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    submitted: float
    input_rms: float


class Call:
    """One caller's hold on a slot. Created by `Engine.open_call`."""

    def __init__(self, engine: Engine, slot: int, call_id: int, seed: int, prompt: PromptPlan | None = None,
                 client: str | None = None):
        """`client`: who placed the call (an address), for the per-client share of the slots."""
        self.engine = engine
        self.client = client
        self.slot = slot
        self.call_id = call_id
        self.seed = seed
        self.stats = CallStats()
        self.closed = False
        self.error: Exception | None = None
        self.prompt = prompt
        self.loop = asyncio.get_running_loop()
        # Resolves to the prompt's replay time in seconds (0.0 with no prompt).
        self.prompt_done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._prompt_started = time.perf_counter()
        if prompt is None:
            self.prompt_done.set_result(0.0)

    @property
    def prompting(self) -> bool:
        return not self.prompt_done.done()

    def finish_prompt(self) -> None:
        """On the event loop: the model has replayed this call's prompt."""
        if not self.prompt_done.done():
            seconds = time.perf_counter() - self._prompt_started
            log.info("call %d: prompt replayed in %.2f s (%s)", self.call_id, seconds, self.prompt.description)
            self.prompt_done.set_result(seconds)

    def fail(self, exc: BaseException) -> None:
        """On the event loop: the engine failed this call; its next frame raises `exc`."""
        self.error = exc
        fail_future(self.prompt_done, exc)

    def submit(self, frame: np.ndarray) -> asyncio.Future:
        """Queue one frame; the future resolves to its FrameResult, or raises FrameDropped.

        A caller that must keep reading its input while the model works (the WebRTC
        peer) submits here and awaits the futures in order elsewhere.
        """
        if self.closed:
            raise CallClosed(f"call {self.call_id} is closed")
        if self.error is not None:
            raise self.error
        frame = check_frame(frame, self.engine.frame_size)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        level = rms(frame)
        self.stats.frames_in += 1
        self.stats.input_rms_sum += level
        log.debug("call %d slot %d input rms %.4f", self.call_id, self.slot, level)
        self.engine.queue_frame(PendingFrame(self, frame, future, loop, time.perf_counter(), level))
        return future

    async def process(self, frame: np.ndarray) -> FrameResult:
        """Submit one frame and await the model's frame for it."""
        return await self.submit(frame)

    async def close(self) -> None:
        await self.engine.close_call(self)

    def deliver(self, pending: PendingFrame, output: SlotOutput, step_ms: float, prompting: bool = False) -> None:
        """On the event loop: account for the step's output and resolve the frame's future.
        `prompting`: the frame came while the slot replayed its prompt and was not fed to the model."""
        if pending.future.done():
            return
        self.stats.frames_during_prompt += int(prompting)
        if output.error is not None:
            self.stats.token_errors += 1
            self.error = output.error
        if self.error is not None:  # frames queued before the failure go down with it
            pending.future.set_exception(self.error)
            return
        silent = output.audio is None
        audio = np.zeros(self.engine.frame_size, np.float32) if silent else output.audio.astype(np.float32)
        result = FrameResult(
            audio=audio,
            text=output.text,
            silent=silent,
            input_rms=pending.input_rms,
            output_rms=rms(audio),
            step_ms=step_ms,
            latency_ms=1000 * (time.perf_counter() - pending.submitted),
        )
        self.stats.count_result(result)
        pending.future.set_result(result)


def fail_future(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
