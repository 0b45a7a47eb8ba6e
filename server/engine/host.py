"""The engine's side of the process boundary: serves media workers' calls from the one Engine.

Each worker connects to a Unix socket and opens calls through it; the host
holds the engine's `Call` objects and feeds their frames in, results out. A
worker can only reach the calls it opened (frames naming any other call id are
refused and counted), so a confused or hostile worker cannot touch another
caller's slot. When a worker's connection ends (it exited, crashed or was
killed) every call it held is closed and its slots are free again at once.
Results are sent without waiting: a worker that stops reading loses its own
results, never delays the engine or anyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from ..model.persona import Persona, PersonaError
from . import wire
from .call import Call
from .channel import MessageChannel
from .engine import Engine
from .errors import ClientAtLimit, EngineFull, EngineNotReady, FrameDropped
from .frames import FrameResult

log = logging.getLogger(__name__)


@dataclass
class HostStats:
    frames_in: int = 0
    results_out: int = 0
    results_dropped: int = 0  # a worker's socket was full: it stopped reading
    bad_messages: int = 0
    foreign_frames: int = 0  # frames naming a call the worker does not hold
    workers_lost: int = 0  # connections that ended with calls still open


@dataclass
class WorkerLink:
    """One connected worker: its channel, its calls, and where its HTTP side listens."""

    channel: MessageChannel
    index: int | None = None
    http_port: int | None = None
    pid: int | None = None
    calls: dict[int, Call] = field(default_factory=dict)
    hello: asyncio.Event = field(default_factory=asyncio.Event)


class EngineHost:
    def __init__(self, engine: Engine, path: str):
        self.engine = engine
        self.path = path
        self.links: list[WorkerLink] = []
        self.stats = HostStats()
        self.link_listeners: list[Callable[[WorkerLink], None]] = []  # called when a worker says hello
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(self.path)
        os.chmod(self.path, 0o600)
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        asyncio.get_running_loop().add_reader(listener.fileno(), self._accept)

    async def stop(self) -> None:
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        for link in list(self.links):
            link.channel.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def calls_held(self) -> int:
        return sum(len(link.calls) for link in self.links)

    # -- connections -----------------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        link: WorkerLink | None = None

        def on_message(message: bytes) -> None:
            self._on_message(link, message)

        link = WorkerLink(MessageChannel(sock, on_message, lambda: self._on_close(link)))
        self.links.append(link)

    def _on_close(self, link: WorkerLink) -> None:
        if link in self.links:
            self.links.remove(link)
        if link.calls:
            self.stats.workers_lost += 1
            log.warning("media worker %s ended holding %d call(s): freeing their slots", link.index, len(link.calls))
        for call in list(link.calls.values()):
            self._spawn(call.close())
        link.calls.clear()
        self._broadcast_status()

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def status(self) -> dict:
        engine = self.engine
        return {"ready": engine.ready, "fatal": None if engine.fatal is None else str(engine.fatal),
                "free_slots": engine.free_slots if engine.ready else 0}

    def _broadcast_status(self) -> None:
        message = wire.control_message("status", **self.status())
        for link in self.links:
            link.channel.send(message)

    # -- messages --------------------------------------------------------------------------------

    def _on_message(self, link: WorkerLink, message: bytes) -> None:
        try:
            kind = wire.kind_of(message)
            if kind == wire.FRAME:
                self._on_frame(link, *wire.parse_frame(message, self.engine.frame_size))
            elif kind == wire.CONTROL:
                self._on_control(link, wire.parse_control(message))
            else:
                raise wire.WireError(f"unknown message kind {kind}")
        except wire.WireError as exc:
            self.stats.bad_messages += 1
            log.warning("media worker %s sent a bad message: %s", link.index, exc)

    def _on_control(self, link: WorkerLink, fields: dict) -> None:
        kind = fields["kind"]
        if kind == "hello":
            link.index, link.http_port, link.pid = fields.get("index"), fields.get("http_port"), fields.get("pid")
            engine = self.engine
            link.channel.send(wire.control_message(
                "welcome", info=engine.info, frame_size=engine.frame_size, sample_rate=engine.sample_rate,
                batch_size=engine.batch_size, takes_persona=engine.prompt_book is not None, **self.status()))
            link.hello.set()
            for listener in self.link_listeners:
                listener(link)
        elif kind == "open":
            self._spawn(self._open(link, fields))
        elif kind == "close":
            call = link.calls.pop(fields.get("call_id"), None)
            if call is not None:
                self._spawn(self._close(call, link))
        else:
            raise wire.WireError(f"unknown control message {kind!r}")

    async def _open(self, link: WorkerLink, fields: dict) -> None:
        request = fields.get("request")
        try:
            persona = fields.get("persona")
            plan = None
            if persona is not None or self.engine.prompt_book is not None:
                plan = self.engine.plan_persona(Persona(**persona) if persona is not None else None)
            call = await self.engine.open_call(seed=fields.get("seed"), prompt=plan, client=fields.get("client"),
                                               client_limit=fields.get("client_limit"))
        except (EngineFull, EngineNotReady, ClientAtLimit, PersonaError, TypeError) as exc:
            refusal = {EngineFull: "busy", EngineNotReady: "not_ready", ClientAtLimit: "client_limit"}.get(
                type(exc), "persona")
            link.channel.send(wire.control_message("refused", request=request, refusal=refusal, message=str(exc)))
            return
        if link.channel.closed:  # the worker went while the slot was being reset
            await call.close()
            return
        link.calls[call.call_id] = call
        link.channel.send(wire.control_message(
            "opened", request=request, call_id=call.call_id, slot=call.slot, seed=call.seed,
            prompt=call.prompt.description if call.prompt is not None else None))
        self._broadcast_status()
        if call.prompt is not None:
            call.prompt_done.add_done_callback(lambda done: self._prompt_done(link, call, done))

    def _prompt_done(self, link: WorkerLink, call: Call, done: asyncio.Future) -> None:
        if done.cancelled():
            return
        error = done.exception()
        link.channel.send(wire.control_message(
            "prompt_done", call_id=call.call_id, seconds=None if error else done.result(),
            error=None if error is None else str(error)))

    async def _close(self, call: Call, link: WorkerLink | None = None) -> None:
        """Free the call's slot; the worker that asked hears `closed` once the slot is free."""
        await call.close()
        if link is not None:
            link.channel.send(wire.control_message("closed", call_id=call.call_id))
        self._broadcast_status()

    def _on_frame(self, link: WorkerLink, call_id: int, seq: int, frame) -> None:
        call = link.calls.get(call_id)
        if call is None:
            self.stats.foreign_frames += 1
            return
        self.stats.frames_in += 1
        try:
            future = call.submit(frame)
        except Exception as exc:  # noqa: BLE001 - a bad frame or a failed call: tell the worker, keep serving
            link.calls.pop(call_id, None)
            link.channel.send(wire.control_message("call_failed", call_id=call_id, error=str(exc)))
            self._spawn(self._close(call))
            return
        future.add_done_callback(lambda done: self._send_result(link, call_id, seq, done))

    def _send_result(self, link: WorkerLink, call_id: int, seq: int, done: asyncio.Future) -> None:
        if done.cancelled() or link.channel.closed:
            return
        error = done.exception()
        if isinstance(error, FrameDropped):
            message = wire.dropped_message(call_id, seq)
        elif error is not None:
            message = wire.control_message("call_failed", call_id=call_id, error=str(error))
        else:
            result: FrameResult = done.result()
            message = wire.result_message(call_id, seq, result.audio, result.text, result.silent,
                                          result.input_rms, result.output_rms, result.step_ms)
        if link.channel.send(message):
            self.stats.results_out += 1
        else:
            self.stats.results_dropped += 1
