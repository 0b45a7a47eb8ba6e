"""The engine as a media worker sees it: the Engine's call API, served by the engine process.

`RemoteEngine` and `RemoteCall` offer what the signaling service and the call
sessions use of `Engine` and `Call` (open a call, submit frames and await their
results in order, close), so the media code runs unchanged in a worker.
Admission stays exact across workers: every `open_call` asks the engine
process, which owns the slots. When the engine process goes away, every call
fails with a clear reason and `engine_lost` fires, so the worker can end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..model.persona import Persona, PersonaError
from ..model.stepper import ModelInfo
from . import wire
from .channel import MessageChannel
from .errors import CallClosed, ClientAtLimit, EngineFull, EngineNotReady, FrameDropped, no_persona_error
from .frames import CallStats, FrameResult, check_frame, rms
from .inference import EngineStats

log = logging.getLogger(__name__)
CLOSE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RemotePrompt:
    """What a worker knows of a call's persona prompt: its description (the engine holds the plan)."""

    description: str


class EngineLost(RuntimeError):
    """The engine process went away: every call ends."""


class RemoteCall:
    def __init__(self, engine: RemoteEngine, call_id: int, slot: int, seed: int, prompt: RemotePrompt | None):
        self.engine, self.call_id, self.slot, self.seed, self.prompt = engine, call_id, slot, seed, prompt
        self.stats = CallStats()
        self.closed = False
        self.error: BaseException | None = None
        self.prompt_done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if prompt is None:
            self.prompt_done.set_result(0.0)
        self._seq = itertools.count()
        self._waiting: dict[int, tuple[asyncio.Future, float, float]] = {}  # seq -> future, sent at, input rms

    @property
    def prompting(self) -> bool:
        return not self.prompt_done.done()

    def submit(self, frame: np.ndarray) -> asyncio.Future:
        """Send one frame to the engine; the future resolves to its FrameResult or raises FrameDropped."""
        if self.closed:
            raise CallClosed(f"call {self.call_id} is closed")
        if self.error is not None:
            raise self.error
        frame = check_frame(frame, self.engine.frame_size)
        future = asyncio.get_running_loop().create_future()
        seq = next(self._seq) & 0xFFFFFFFF
        level = rms(frame)
        self.stats.frames_in += 1
        self.stats.input_rms_sum += level
        if self.engine.send(wire.frame_message(self.call_id, seq, frame)):
            self._waiting[seq] = (future, time.perf_counter(), level)
        else:  # the engine's socket is full: it is behind, so this frame is dropped as it would drop it
            self.stats.frames_dropped += 1
            future.set_exception(FrameDropped("the engine process is not keeping up"))
        return future

    async def process(self, frame: np.ndarray) -> FrameResult:
        return await self.submit(frame)

    async def close(self) -> None:
        """Give the slot back; returns once the engine has freed it (or is gone)."""
        if self.closed:
            return
        self.closed = True
        for future, _, _ in self._waiting.values():
            future.cancel()
        self._waiting.clear()
        freed = self.engine.expect_closed(self.call_id)
        if self.engine.send(wire.control_message("close", call_id=self.call_id)):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(freed), CLOSE_TIMEOUT_S)
        self.engine.forget(self)

    def on_result(self, result: wire.WireResult) -> None:
        waiting = self._waiting.pop(result.seq, None)
        if waiting is None or waiting[0].done():
            return
        future, sent_at, _ = waiting
        answer = FrameResult(audio=result.audio, text=result.text, silent=result.silent,
                             input_rms=result.input_rms, output_rms=result.output_rms,
                             step_ms=result.step_ms, latency_ms=1000 * (time.perf_counter() - sent_at))
        self.stats.count_result(answer)
        future.set_result(answer)

    def on_dropped(self, seq: int) -> None:
        waiting = self._waiting.pop(seq, None)
        self.stats.frames_dropped += 1
        if waiting is not None and not waiting[0].done():
            waiting[0].set_exception(FrameDropped("the model fell behind; the oldest frame was dropped"))

    def fail(self, error: BaseException) -> None:
        """Every waiting frame and every later submit raises `error`."""
        self.error = error
        for future, _, _ in self._waiting.values():
            if not future.done():
                future.set_exception(error)
        self._waiting.clear()
        if not self.prompt_done.done():
            self.prompt_done.set_exception(error)


class RemoteEngine:
    """Engine-shaped proxy for the engine process, over one socket."""

    def __init__(self, path: str):
        self.path = path
        self.ready = False
        self.fatal: BaseException | None = None
        self.stats = EngineStats()  # the engine process counts steps; a worker has none of its own
        self.step_listeners: list[Callable[[float, int], None]] = []
        self.engine_lost: list[Callable[[], None]] = []
        self.info: ModelInfo | None = None
        self.frame_size = 0
        self.sample_rate = 0
        self.batch_size = 0
        self.free_slots = 0
        self.takes_persona = False
        self._channel: MessageChannel | None = None
        self._calls: dict[int, RemoteCall] = {}
        self._closing: dict[int, asyncio.Future] = {}  # call id -> resolves when the engine freed its slot
        self._requests: dict[int, asyncio.Future] = {}
        self._request_ids = itertools.count(1)
        self._welcome: asyncio.Future | None = None

    async def connect(self, index: int, http_port: int) -> None:
        """Connect and say who this worker is; returns once the engine has described its model."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(self.path)
        self._welcome = asyncio.get_running_loop().create_future()
        self._channel = MessageChannel(sock, self._on_message, self._on_close)
        self.send(wire.control_message("hello", index=index, http_port=http_port, pid=os.getpid()))
        await self._welcome

    def send(self, message: bytes) -> bool:
        return self._channel is not None and self._channel.send(message)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    # -- the Engine API the media side uses ------------------------------------------------------

    @property
    def prompt_book(self) -> object | None:
        """Truthy when the model takes a persona (the engine process holds the book itself)."""
        return True if self.takes_persona else None

    def plan_persona(self, persona: Persona | None) -> Persona | None:
        """Personas are checked by the engine process when the call opens; here they pass through."""
        if not self.takes_persona:
            raise no_persona_error(self.info)
        return persona

    async def check_device(self) -> bool:
        return self.fatal is None and self._channel is not None and not self._channel.closed

    async def open_call(self, seed: int | None = None, prompt: Persona | None = None, client: str | None = None,
                        client_limit: int | None = None) -> RemoteCall:
        if self.fatal is not None:
            raise EngineNotReady(str(self.fatal))
        request = next(self._request_ids)
        answer = asyncio.get_running_loop().create_future()
        self._requests[request] = answer
        persona = dataclasses.asdict(prompt) if prompt is not None else None
        if not self.send(wire.control_message("open", request=request, seed=seed, persona=persona, client=client,
                                                 client_limit=client_limit)):
            self._requests.pop(request, None)
            raise EngineNotReady("the engine process is not answering")
        try:
            fields = await answer
        except asyncio.CancelledError:  # the caller gave up: if the slot was granted, give it back
            answer.add_done_callback(self._release_late_grant)
            raise
        finally:
            self._requests.pop(request, None)
        if fields["kind"] == "refused":
            error = {"busy": EngineFull, "not_ready": EngineNotReady, "client_limit": ClientAtLimit}.get(
                fields["refusal"], PersonaError)
            raise error(fields["message"])
        description = fields.get("prompt")
        call = RemoteCall(self, fields["call_id"], fields["slot"], fields["seed"],
                          RemotePrompt(description) if description is not None else None)
        self._calls[call.call_id] = call
        return call

    def _release_late_grant(self, answer: asyncio.Future) -> None:
        if not answer.cancelled() and answer.exception() is None and answer.result()["kind"] == "opened":
            self.send(wire.control_message("close", call_id=answer.result()["call_id"]))

    def forget(self, call: RemoteCall) -> None:
        self._calls.pop(call.call_id, None)
        self._closing.pop(call.call_id, None)

    def expect_closed(self, call_id: int) -> asyncio.Future:
        """A future that resolves when the engine says the call's slot is free (or the engine goes)."""
        freed = asyncio.get_running_loop().create_future()
        if self._channel is None or self._channel.closed:
            freed.set_result(None)
        self._closing[call_id] = freed
        return freed

    # -- messages ----------------------------------------------------------------------------------

    def _on_message(self, message: bytes) -> None:
        kind = wire.kind_of(message)
        if kind == wire.RESULT:
            result = wire.parse_result(message, self.frame_size)
            call = self._calls.get(result.call_id)
            if call is not None:
                call.on_result(result)
        elif kind == wire.DROPPED:
            call_id, seq = wire.parse_dropped(message)
            if (call := self._calls.get(call_id)) is not None:
                call.on_dropped(seq)
        elif kind == wire.CONTROL:
            self._on_control(wire.parse_control(message))

    def _on_control(self, fields: dict) -> None:
        kind = fields["kind"]
        if kind == "welcome":
            self.info, self.frame_size, self.sample_rate = fields["info"], fields["frame_size"], fields["sample_rate"]
            self.batch_size, self.takes_persona = fields["batch_size"], fields["takes_persona"]
            self._status(fields)
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_result(None)
        elif kind == "status":
            self._status(fields)
        elif kind in ("opened", "refused"):
            answer = self._requests.get(fields.get("request"))
            if answer is not None and not answer.done():
                answer.set_result(fields)
            elif kind == "opened":  # nobody waits any more (the offer timed out): give the slot back
                self.send(wire.control_message("close", call_id=fields["call_id"]))
        elif kind == "prompt_done":
            call = self._calls.get(fields["call_id"])
            if call is not None and not call.prompt_done.done():
                if fields.get("error"):
                    call.prompt_done.set_exception(RuntimeError(fields["error"]))
                else:
                    call.prompt_done.set_result(fields["seconds"])
        elif kind == "closed":
            freed = self._closing.get(fields["call_id"])
            if freed is not None and not freed.done():
                freed.set_result(None)
        elif kind == "call_failed":
            call = self._calls.get(fields["call_id"])
            if call is not None:
                call.fail(RuntimeError(fields["error"]))

    def _status(self, fields: dict) -> None:
        self.ready = bool(fields["ready"])
        self.free_slots = int(fields["free_slots"])
        if fields.get("fatal"):
            self.fatal = RuntimeError(fields["fatal"])

    def _on_close(self) -> None:
        """The engine process is gone: fail every call with a reason a caller can read, then tell the worker."""
        self.ready = False
        if self.fatal is None:
            self.fatal = EngineLost("the model engine process stopped")
        for answer in self._requests.values():
            if not answer.done():
                answer.set_exception(EngineNotReady(str(self.fatal)))
        for call in list(self._calls.values()):
            call.fail(EngineLost(str(self.fatal)))
        for freed in self._closing.values():
            if not freed.done():
                freed.set_result(None)
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_exception(EngineLost("the engine process closed the connection"))
        for listener in self.engine_lost:
            listener()
