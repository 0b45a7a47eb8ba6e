"""The inference thread: the one thread that runs the model, and the queues the event loop feeds it.

`Engine` (server.engine.engine) is the event loop's side; this base class is the thread's side and
the hand-over between them: per-slot frame queues and model operations, under one condition
variable. Everything below "the inference thread" runs on that thread only; results go back to each
call's event loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..model.stepper import SlotOutput, Stepper
from .call import Call, PendingFrame, fail_future
from .errors import DeviceFailed, EngineNotReady, FrameDropped, is_device_fatal

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    steps: int = 0
    slot_steps: int = 0
    prompt_steps: int = 0
    token_errors: int = 0
    frames_dropped: int = 0
    calls_opened: int = 0
    step_ms: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

    def summary(self) -> dict:
        """Counts, and step time percentiles over the last 4096 steps."""
        times = np.array(self.step_ms) if self.step_ms else np.zeros(1)
        return {
            "steps": self.steps,
            "slot_steps": self.slot_steps,
            "prompt_steps": self.prompt_steps,
            "frames_dropped": self.frames_dropped,
            "token_errors": self.token_errors,
            "calls_opened": self.calls_opened,
            "step_ms_p50": round(float(np.percentile(times, 50)), 3),
            "step_ms_p99": round(float(np.percentile(times, 99)), 3),
        }


class InferenceLoop:
    """The model's thread, its work queues, and the slots' calls, shared with the event loop's side."""

    def __init__(
        self,
        *,
        max_backlog_frames: int = 3,
        thread_name: str = "moshi-inference",
    ):
        """`max_backlog_frames`: frames a call may have waiting; past it the oldest is dropped, so when
        steps take longer than a frame the delay stays bounded instead of growing without end."""
        if max_backlog_frames < 1:
            raise ValueError("max_backlog_frames must be at least 1")
        self.max_backlog_frames = max_backlog_frames
        self._thread_name = thread_name
        self._stepper: Stepper | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._ops: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._pending: list[deque[PendingFrame]] = []
        self._slots: list[Call | None] = []
        self._stopping = False
        self.ready = False
        self.fatal: BaseException | None = None
        self.stats = EngineStats()
        self.fatal_listeners: list[Callable[[BaseException], None]] = []  # called on the event loop
        self.step_listeners: list[Callable[[float, int], None]] = []  # (step seconds, rows): inference thread
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def thread_alive(self) -> bool:
        """Whether the inference thread is still running (it ends on stop() and on a fatal error)."""
        return self._thread is not None and self._thread.is_alive()

    def queue_frame(self, item: PendingFrame) -> None:
        """On the event loop: queue a call's frame for the next step, dropping the oldest past the backlog."""
        dropped = []
        with self._cond:
            if self._stopping:
                raise EngineNotReady("engine stopped")
            queue = self._pending[item.call.slot]
            queue.append(item)
            while len(queue) > self.max_backlog_frames:
                dropped.append(queue.popleft())
            self._cond.notify()
        for old in dropped:  # on the event loop already: resolve directly
            old.call.stats.frames_dropped += 1
            self.stats.frames_dropped += 1
            if not old.future.done():
                old.future.set_exception(FrameDropped(f"call {old.call.call_id}: the model fell behind"))

    def post_op(self, fn: Callable[[], Any]) -> None:
        """Queue `fn` for the inference thread without waiting for it."""
        with self._cond:
            if not self._stopping:
                self._ops.append((fn, concurrent.futures.Future()))
                self._cond.notify()

    async def run_op(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the inference thread between steps and await its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise EngineNotReady("engine stopped")
            self._ops.append((fn, future))
            self._cond.notify()
        return await asyncio.wrap_future(future)

    # -- the inference thread --------------------------------------------------------------

    def _prompting(self) -> np.ndarray:
        """Slots replaying a prompt (inference thread only)."""
        if self._stepper is None:
            return np.zeros(0, dtype=bool)
        return self._stepper.prompting_rows()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._ops or any(self._pending) or self._prompting().any()):
                    self._cond.wait()
                if self._stopping:
                    ops, batch = list(self._ops), []
                    self._ops.clear()
                else:
                    ops = list(self._ops)
                    self._ops.clear()
                    batch = [queue.popleft() for queue in self._pending if queue]
            try:
                self._run_ops(ops)
                if self._stopping:
                    return
                prompting = self._prompting()
                if batch or prompting.any():
                    self._step(batch, prompting)
            except Exception as exc:  # noqa: BLE001 - a dead thread must not look like a live engine
                log.exception("the inference loop failed")
                self._die(exc, in_flight=batch)
                return

    def _run_ops(self, ops: list[tuple[Callable[[], Any], concurrent.futures.Future]]) -> None:
        for fn, future in ops:
            if not future.set_running_or_notify_cancel():
                continue  # its awaiter gave up (a timed-out readiness probe, a cancelled open_call)
            if self._stopping:
                future.set_exception(EngineNotReady("engine stopped"))
                continue
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                future.set_exception(exc)
            else:
                future.set_result(result)

    def _step(self, batch: list[PendingFrame], prompting: np.ndarray) -> None:
        stepper = self.stepper
        for item in [item for item in batch if item.call.error is not None]:
            batch.remove(item)  # the engine already failed this call: its frames never reach the model again
            item.loop.call_soon_threadsafe(fail_future, item.future, item.call.error)
        for item in [item for item in batch if prompting[item.call.slot]]:
            # A slot replaying its prompt does not hear its caller yet: the frame gets silence now.
            batch.remove(item)
            item.loop.call_soon_threadsafe(item.call.deliver, item, SlotOutput(), 0.0, True)
        frames = np.zeros((stepper.batch_size, stepper.frame_size), dtype=np.float32)
        rows = np.zeros(stepper.batch_size, dtype=bool)
        for item in batch:
            frames[item.call.slot] = item.frame
            rows[item.call.slot] = True
        started = time.perf_counter()
        try:
            outputs = stepper.step(frames, rows)
        except Exception as exc:
            if is_device_fatal(exc):
                self._die(exc, in_flight=batch)
                return
            if int(rows.sum() + prompting.sum()) == 1:
                self._fail_slots(np.flatnonzero(rows | prompting), batch, exc)
                return
            log.exception("a batched step failed; retrying its slots one at a time to find the one at fault")
            outputs = self._step_one_by_one(frames, rows, prompting, batch)
            if outputs is None:
                return
        step_ms = 1000 * (time.perf_counter() - started)
        self.stats.steps += 1
        self.stats.slot_steps += len(batch)
        self.stats.prompt_steps += int(prompting.sum())
        self.stats.step_ms.append(step_ms)
        for listener in self.step_listeners:
            listener(step_ms / 1000, len(batch) + int(prompting.sum()))
        for item in batch:
            output = outputs[item.call.slot]
            if output.error is not None:
                self.stats.token_errors += 1
                log.error("call %d: %s", item.call.call_id, output.error)
            item.loop.call_soon_threadsafe(item.call.deliver, item, output, step_ms)
        self._announce_finished_prompts(prompting)

    def _announce_finished_prompts(self, prompting_before: np.ndarray) -> None:
        """Slots that were replaying a prompt before this step and no longer are: tell their calls."""
        finished = prompting_before & ~self.stepper.prompting_rows()
        for slot in np.flatnonzero(finished):
            call = self._slots[slot]
            if call is not None and call.error is None:
                call.loop.call_soon_threadsafe(call.finish_prompt)

    def _step_one_by_one(
        self, frames: np.ndarray, rows: np.ndarray, prompting: np.ndarray, batch: list[PendingFrame]
    ) -> list[SlotOutput] | None:
        """Each slot of a failed step alone: the one that still fails loses its call, the others go on.

        Slots whose frame was encoded before the failure hear it twice: one 80 ms glitch, not a lost call."""
        stepper = self.stepper
        outputs = [SlotOutput() for _ in range(stepper.batch_size)]
        none = np.zeros(stepper.batch_size, dtype=bool)
        for slot in np.flatnonzero(rows | prompting):
            alone = none.copy()
            alone[slot] = True
            try:
                out = stepper.step(frames, alone & rows, prompts=alone & prompting)
            except Exception as exc:
                if is_device_fatal(exc):
                    self._die(exc, in_flight=batch)
                    return None
                self._fail_slots([slot], batch, exc)
                continue
            outputs[slot] = out[slot]
        return outputs

    def _fail_slots(self, slots, batch: list[PendingFrame], exc: Exception) -> None:
        """End these slots' calls with `exc` (their peers say so on `events` and hang up)."""
        log.error("call slot(s) %s failed: %s: %s", list(slots), type(exc).__name__, exc)
        for slot in slots:
            self.stepper.end_prompt(int(slot))
            with self._cond:
                waiting = list(self._pending[slot])
                self._pending[slot].clear()
                call = self._slots[slot]
                if call is not None:
                    call.error = exc  # at once, on this thread: no later frame of it is stepped
            for item in [item for item in batch if item.call.slot == slot] + waiting:
                if item in batch:
                    batch.remove(item)
                item.loop.call_soon_threadsafe(fail_future, item.future, exc)
            if call is not None:
                call.loop.call_soon_threadsafe(call.fail, exc)

    def _die(self, exc: BaseException, in_flight: list[PendingFrame] | None = None) -> None:
        """A fatal error (the device, or the inference loop itself): fail every call, every waiting frame
        and every queued operation, and take no more work."""
        log.critical("the engine stops: %s: %s", type(exc).__name__, exc)
        what = "the model's device failed" if is_device_fatal(exc) else "the inference engine failed"
        fatal = DeviceFailed(f"{what} ({type(exc).__name__}: {exc}); the server must restart")
        with self._cond:
            self.fatal = fatal
            self.ready = False
            self._stopping = True
            pending = list(in_flight or ()) + [p for queue in self._pending for p in queue]
            for queue in self._pending:
                queue.clear()
            calls = [call for call in self._slots if call is not None]
            ops = list(self._ops)
            self._ops.clear()
        for _, future in ops:  # nobody may wait forever on work this thread will not do
            if future.set_running_or_notify_cancel():
                future.set_exception(fatal)
        for item in pending:
            item.loop.call_soon_threadsafe(fail_future, item.future, fatal)
        for call in calls:
            call.loop.call_soon_threadsafe(call.fail, fatal)
        if self._loop is not None:
            for listener in self.fatal_listeners:
                self._loop.call_soon_threadsafe(listener, fatal)
