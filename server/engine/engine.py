"""The streaming engine: call slots on one shared model, run by one inference thread.

Public interface
----------------
    engine = create_engine(ModelSource("tiny"), max_calls=4)   # server.engine.setup
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
- An out-of-range token is an error for its call (see `server.model.tokens`); the
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
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable

from ..model.persona import Persona, PromptBook, PromptPlan
from ..model.stepper import ModelInfo, Stepper
from .call import Call, fail_future
from .errors import ClientAtLimit, EngineFull, EngineNotReady, no_persona_error
from .inference import InferenceLoop

log = logging.getLogger(__name__)


class Engine(InferenceLoop):
    """Call slots on one shared model, stepped by the engine's own inference thread."""

    def __init__(
        self,
        stepper_factory: Callable[[], Stepper],
        *,
        max_backlog_frames: int = 3,
        thread_name: str = "moshi-inference",
    ):
        """`stepper_factory` builds the model on the inference thread; `max_backlog_frames`: see InferenceLoop."""
        super().__init__(max_backlog_frames=max_backlog_frames, thread_name=thread_name)
        self._factory = stepper_factory
        self._next_call_id = 1

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Build the stepper and warm up on the inference thread; calls are accepted afterwards."""
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()
        stepper = await self.run_op(self._factory)
        self._pending = [deque() for _ in range(stepper.batch_size)]
        self._slots = [None] * stepper.batch_size
        self._stepper = stepper
        started = time.perf_counter()
        await self.run_op(stepper.warm_up)
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
            item.loop.call_soon_threadsafe(fail_future, item.future, EngineNotReady("engine stopped"))
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

        return await self.run_op(probe)

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

    async def open_call(self, seed: int | None = None, prompt: PromptPlan | None = None, client: str | None = None,
                        client_limit: int | None = None) -> Call:
        """Take a free slot, reset it, and start replaying `prompt` there if one is given.
        Raises EngineNotReady before warm-up, EngineFull when full, else ClientAtLimit when `client` holds
        `client_limit` slots (counted here, where slots are taken, so concurrent offers cannot pass it)."""
        if self.fatal is not None:
            raise EngineNotReady(f"the model's device failed: {self.fatal}")
        if not self.ready:
            raise EngineNotReady("the engine is still warming up")
        with self._cond:
            free = [slot for slot, call in enumerate(self._slots) if call is None]
            if not free:
                raise EngineFull(f"all {len(self._slots)} call slots are busy")
            if client is not None and client_limit is not None:
                held = sum(1 for taken in self._slots if taken is not None and taken.client == client)
                if held >= client_limit:
                    raise ClientAtLimit(f"{client} already has {held} call(s) in progress or being set up; at most "
                                        f"{client_limit} of the {len(self._slots)} lines go to one client")
            slot = free[0]
            call = Call(self, slot, self._next_call_id, seed if seed is not None else secrets.randbits(63), prompt,
                        client)
            self._next_call_id += 1
            self._slots[slot] = call

        def reset() -> None:
            self.stepper.reset_slots([slot], [call.seed])
            if prompt is not None:
                self.stepper.start_prompt(slot, prompt)

        try:
            await self.run_op(reset)
        except BaseException:
            with self._cond:
                self._slots[slot] = None
            if prompt is not None:  # the reset may have run before the cancel: end a prompt nobody hears
                self.post_op(lambda: self.stepper.end_prompt(slot) if self._slots[slot] is None else None)
            raise
        self.stats.calls_opened += 1
        log.info("call %d opened in slot %d (seed %d)", call.call_id, slot, call.seed)
        return call

    async def close_call(self, call: Call) -> None:
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
                await self.run_op(lambda: self.stepper.end_prompt(call.slot))
        except EngineNotReady:
            pass  # the engine stopped or died meanwhile: nothing runs on the slot any more
        finally:
            with self._cond:
                if self._slots[call.slot] is call:
                    self._slots[call.slot] = None
        log.info("call %d closed, slot %d free (%d frames in, %d out, %d silent)", call.call_id, call.slot,
                 call.stats.frames_in, call.stats.frames_out, call.stats.frames_silent)
