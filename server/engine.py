"""The streaming engine: call slots on one shared model, run by one inference thread.

Public interface
----------------
    engine = create_engine(ModelSource("tiny"), max_calls=4)   # server.engine_setup
    await engine.start()            # builds the model and warms up, on the inference thread
    engine.info                     # ModelInfo: name, is_test_model, notice, layout line
    call = await engine.open_call(seed=None)    # takes a free slot; EngineFull when none
    plan = engine.plan_persona(Persona(...))    # PersonaPlex-style models: check a persona (PersonaError)
    call = await engine.open_call(prompt=plan)  # ... and replay it in the call's slot first;
    await call.prompt_done                      # resolves when the model has heard it
    result = await call.process(frame)          # frame: float32 [-1, 1], engine.frame_size samples
    result.audio, result.text                   # the model's 80 ms of audio, a text piece or None
    future = call.submit(frame)                 # the same without waiting; FrameDropped if the model
                                                # fell behind by more than max_backlog_frames
    call.stats                                  # CallStats: frames, silences, RMS, step times, errors
    await call.close()                          # frees the slot; pending frames are cancelled
    await engine.stop()

Rules it keeps:
- The event loop never runs the model. A single thread owned by the engine
  does every piece of model work (load, warm-up, reset, step); coroutines
  submit frames and await futures.
- One output frame per input frame, in order. Frames of different calls that
  are ready together run in one batched step; slots with no frame ready are
  masked out of that step and left untouched.
- Opening a call resets only its slot, with its own sampling seed (random
  unless given), so a call never hears a previous caller and two calls with the
  same seed and input give the same output.
- Frames must be float32 PCM in [-1, 1]: int16 samples, as ints or as floats,
  are refused with an error instead of becoming static.
- Delay stays bounded: a call holds at most `max_backlog_frames` frames waiting; when the model
  falls behind, the oldest are dropped (FrameDropped) and counted, never queued without end.
- An out-of-range token is an error for its call (see `server.tokens`); the
  call fails, the other calls go on, and the engine counts it.
- A failure is contained where it can be: an exception in a batched step is
  retried slot by slot, and only the slot that fails alone loses its call. A
  device error (a CUDA error leaves the context unusable) is fatal: every call
  fails with it, the engine takes no more calls, and `fatal` says why, so
  health checks fail and a supervisor restarts the process.
- A persona prompt replays in its own slot, riding along with the other
  calls' steps and in steps of its own when nobody else has a frame waiting,
  so other calls keep their pace. Its caller's frames meanwhile get silence.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .persona import Persona, PersonaError, PromptBook, PromptPlan
from .stepper import ModelInfo, SlotOutput, Stepper

log = logging.getLogger(__name__)

# A float frame whose peak passes this is int16 audio stored as floats, not a loud frame.
_FLOAT_PCM_LIMIT = 2.0


class EngineNotReady(RuntimeError):
    """The engine has not finished warming up (or has stopped)."""


class EngineFull(RuntimeError):
    """Every call slot is taken."""


class CallClosed(RuntimeError):
    """The call was closed; it takes no more frames."""


class FrameDropped(RuntimeError):
    """The model fell behind and this frame was dropped, oldest first, to keep the delay bounded."""


class DeviceFailed(RuntimeError):
    """The model's device failed; nothing more can run on it in this process."""


def is_device_fatal(exc: BaseException) -> bool:
    """A CUDA error poisons the context: every later kernel fails, so the process must be restarted."""
    import torch  # here, not at the top: the engine module itself never touches tensors

    if isinstance(exc, DeviceFailed):
        return True
    if isinstance(exc, getattr(torch, "AcceleratorError", ())):  # torch >= 2.9 raises CUDA failures as it
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "device-side assert")
    )


def no_persona_error(info: ModelInfo) -> PersonaError:
    return PersonaError(f"the model {info.name} ({info.kind}) takes no persona: text and voice prompts "
                        "need a PersonaPlex-style model")


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


@dataclass
class _PendingFrame:
    call: Call
    frame: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    submitted: float
    input_rms: float


class Call:
    """One caller's hold on a slot. Created by `Engine.open_call`."""

    def __init__(self, engine: Engine, slot: int, call_id: int, seed: int, prompt: PromptPlan | None = None):
        self.engine = engine
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

    def _finish_prompt(self) -> None:
        """On the event loop: the model has replayed this call's prompt."""
        if not self.prompt_done.done():
            seconds = time.perf_counter() - self._prompt_started
            log.info("call %d: prompt replayed in %.2f s (%s)", self.call_id, seconds, self.prompt.description)
            self.prompt_done.set_result(seconds)

    def _fail(self, exc: BaseException) -> None:
        """On the event loop: the engine failed this call; its next frame raises `exc`."""
        self.error = exc
        _fail_future(self.prompt_done, exc)

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
        self.engine._submit(_PendingFrame(self, frame, future, loop, time.perf_counter(), level))
        return future

    async def process(self, frame: np.ndarray) -> FrameResult:
        """Submit one frame and await the model's frame for it."""
        return await self.submit(frame)

    async def close(self) -> None:
        await self.engine._close_call(self)

    def _deliver(self, pending: _PendingFrame, output: SlotOutput, step_ms: float, prompting: bool = False) -> None:
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


class Engine:
    """Call slots on one shared model, stepped by the engine's own inference thread."""

    def __init__(
        self,
        stepper_factory: Callable[[], Stepper],
        *,
        max_backlog_frames: int = 3,
        thread_name: str = "moshi-inference",
    ):
        """`max_backlog_frames`: frames a call may have waiting; past it the oldest is dropped, so when
        steps take longer than a frame the delay stays bounded instead of growing without end."""
        if max_backlog_frames < 1:
            raise ValueError("max_backlog_frames must be at least 1")
        self.max_backlog_frames = max_backlog_frames
        self._factory = stepper_factory
        self._thread_name = thread_name
        self._stepper: Stepper | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._ops: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._pending: list[deque[_PendingFrame]] = []
        self._slots: list[Call | None] = []
        self._stopping = False
        self._next_call_id = 1
        self.ready = False
        self.fatal: BaseException | None = None
        self.stats = EngineStats()
        self.fatal_listeners: list[Callable[[BaseException], None]] = []  # called on the event loop
        self.step_listeners: list[Callable[[float, int], None]] = []  # (step seconds, rows): inference thread
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Build the stepper and warm up on the inference thread; calls are accepted afterwards."""
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()
        stepper = await self._run_op(self._factory)
        self._pending = [deque() for _ in range(stepper.batch_size)]
        self._slots = [None] * stepper.batch_size
        self._stepper = stepper
        started = time.perf_counter()
        await self._run_op(stepper.warm_up)
        log.info("engine warmed up in %.2f s: %s, %d call slots", time.perf_counter() - started,
                 stepper.info.name, stepper.batch_size)
        self.ready = True

    async def stop(self) -> None:
        """Fail what is pending, end the thread. Idempotent."""
        self.ready = False
        with self._cond:
            self._stopping = True
            pending = [p for queue in self._pending for p in queue]
            for queue in self._pending:
                queue.clear()
            self._cond.notify_all()
        for item in pending:
            item.loop.call_soon_threadsafe(_fail_future, item.future, EngineNotReady("engine stopped"))
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)

    # -- properties ------------------------------------------------------------------------

    @property
    def stepper(self) -> Stepper:
        if self._stepper is None:
            raise EngineNotReady("the engine has not started")
        return self._stepper

    @property
    def info(self) -> ModelInfo:
        return self.stepper.info

    @property
    def frame_size(self) -> int:
        return self.stepper.frame_size

    @property
    def sample_rate(self) -> int:
        return self.stepper.sample_rate

    @property
    def batch_size(self) -> int:
        return self.stepper.batch_size

    @property
    def free_slots(self) -> int:
        with self._cond:
            return sum(call is None for call in self._slots)

    @property
    def active_calls(self) -> list[Call]:
        with self._cond:
            return [call for call in self._slots if call is not None]

    async def check_device(self) -> bool:
        """A tiny operation on the model's device, run between steps: does the device still answer?"""
        device = getattr(self.stepper, "device", None)

        def probe() -> bool:
            if device is None:  # the echo engine has no device
                return True
            import torch

            return float(torch.ones(2, device=device).sum().item()) == 2.0

        return await self._run_op(probe)

    # -- calls ------------------------------------------------------------------------------

    @property
    def prompt_book(self) -> PromptBook | None:
        """The voices, limits and defaults of a model that takes a persona; None for one that takes none."""
        return self.stepper.prompt_book

    def plan_persona(self, persona: Persona | None) -> PromptPlan:
        """Check a persona against this model's voices and limits (PersonaError says what is wrong)."""
        book = self.prompt_book
        if book is None:
            raise no_persona_error(self.info)
        return book.plan(persona)

    async def open_call(self, seed: int | None = None, prompt: PromptPlan | None = None) -> Call:
        """Take a free slot, reset it, and start replaying `prompt` there if one is given.
        Raises EngineNotReady before warm-up, EngineFull when full."""
        if self.fatal is not None:
            raise EngineNotReady(f"the model's device failed: {self.fatal}")
        if not self.ready:
            raise EngineNotReady("the engine is still warming up")
        with self._cond:
            free = [slot for slot, call in enumerate(self._slots) if call is None]
            if not free:
                raise EngineFull(f"all {len(self._slots)} call slots are busy")
            slot = free[0]
            call = Call(self, slot, self._next_call_id, seed if seed is not None else secrets.randbits(63), prompt)
            self._next_call_id += 1
            self._slots[slot] = call

        def reset() -> None:
            self.stepper.reset_slots([slot], [call.seed])
            if prompt is not None:
                self.stepper.start_prompt(slot, prompt)

        try:
            await self._run_op(reset)
        except BaseException:
            with self._cond:
                self._slots[slot] = None
            if prompt is not None:  # the reset may have run before the cancel: end a prompt nobody hears
                self._post_op(lambda: self.stepper.end_prompt(slot) if self._slots[slot] is None else None)
            raise
        self.stats.calls_opened += 1
        log.info("call %d opened in slot %d (seed %d)", call.call_id, slot, call.seed)
        return call

    async def _close_call(self, call: Call) -> None:
        if call.closed:
            return
        call.closed = True
        with self._cond:
            dropped = list(self._pending[call.slot])
            self._pending[call.slot].clear()
        for item in dropped:
            item.future.cancel()
        try:
            if not self._stopping:
                # Through the thread: once it runs, no step still holds this call's frame or prompt.
                await self._run_op(lambda: self.stepper.end_prompt(call.slot))
        except EngineNotReady:
            pass  # the engine stopped or died meanwhile: nothing runs on the slot any more
        finally:
            with self._cond:
                if self._slots[call.slot] is call:
                    self._slots[call.slot] = None
        log.info("call %d closed, slot %d free (%d frames in, %d out, %d silent)", call.call_id, call.slot,
                 call.stats.frames_in, call.stats.frames_out, call.stats.frames_silent)

    def _submit(self, item: _PendingFrame) -> None:
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

    def _post_op(self, fn: Callable[[], Any]) -> None:
        """Queue `fn` for the inference thread without waiting for it."""
        with self._cond:
            if not self._stopping:
                self._ops.append((fn, concurrent.futures.Future()))
                self._cond.notify()

    async def _run_op(self, fn: Callable[[], Any]) -> Any:
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
                self._die(exc)
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

    def _step(self, batch: list[_PendingFrame], prompting: np.ndarray) -> None:
        stepper = self.stepper
        for item in [item for item in batch if item.call.error is not None]:
            batch.remove(item)  # the engine already failed this call: its frames never reach the model again
            item.loop.call_soon_threadsafe(_fail_future, item.future, item.call.error)
        for item in [item for item in batch if prompting[item.call.slot]]:
            # A slot replaying its prompt does not hear its caller yet: the frame gets silence now.
            batch.remove(item)
            item.loop.call_soon_threadsafe(item.call._deliver, item, SlotOutput(), 0.0, True)
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
                self._die(exc)
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
            item.loop.call_soon_threadsafe(item.call._deliver, item, output, step_ms)
        self._announce_finished_prompts(prompting)

    def _announce_finished_prompts(self, prompting_before: np.ndarray) -> None:
        """Slots that were replaying a prompt before this step and no longer are: tell their calls."""
        finished = prompting_before & ~self.stepper.prompting_rows()
        for slot in np.flatnonzero(finished):
            call = self._slots[slot]
            if call is not None and call.error is None:
                call.loop.call_soon_threadsafe(call._finish_prompt)

    def _step_one_by_one(
        self, frames: np.ndarray, rows: np.ndarray, prompting: np.ndarray, batch: list[_PendingFrame]
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
                    self._die(exc)
                    return None
                self._fail_slots([slot], batch, exc)
                continue
            outputs[slot] = out[slot]
        return outputs

    def _fail_slots(self, slots, batch: list[_PendingFrame], exc: Exception) -> None:
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
                item.loop.call_soon_threadsafe(_fail_future, item.future, exc)
            if call is not None:
                call.loop.call_soon_threadsafe(call._fail, exc)

    def _die(self, exc: BaseException) -> None:
        """A fatal error (the device, or the inference loop itself): fail every call, every waiting frame
        and every queued operation, and take no more work."""
        log.critical("the engine stops: %s: %s", type(exc).__name__, exc)
        what = "the model's device failed" if is_device_fatal(exc) else "the inference engine failed"
        fatal = DeviceFailed(f"{what} ({type(exc).__name__}: {exc}); the server must restart")
        with self._cond:
            self.fatal = fatal
            self.ready = False
            self._stopping = True
            pending = [p for queue in self._pending for p in queue]
            for queue in self._pending:
                queue.clear()
            calls = [call for call in self._slots if call is not None]
            ops = list(self._ops)
            self._ops.clear()
        for _, future in ops:  # nobody may wait forever on work this thread will not do
            if future.set_running_or_notify_cancel():
                future.set_exception(fatal)
        for item in pending:
            item.loop.call_soon_threadsafe(_fail_future, item.future, fatal)
        for call in calls:
            call.loop.call_soon_threadsafe(call._fail, fatal)
        if self._loop is not None:
            for listener in self.fatal_listeners:
                self._loop.call_soon_threadsafe(listener, fatal)


def _fail_future(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
