"""One bad slot or one bad frame must not take everyone down; a dead device must be said, not hidden.

Faults that a healthy test machine cannot produce (an exception inside one
slot's model step, a CUDA error) are injected by wrapping the stepper; all
else is real: the tiny model, real aiortc callers, the real signaling app.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

import aiohttp
import numpy as np
import pytest
import torch
from conftest import noise_frames, start_server, stop_server

from server.caller import place_call
from server.engine import DeviceFailed, EngineNotReady, is_device_fatal
from server.engine.setup import create_engine
from server.model.moshi_step import GREEDY
from server.model.source import ModelSource


def fail_slot_decode(stepper, slot: int, after: int = 3):
    """Make Mimi's decode raise whenever `slot` is among the rows decoded, from the `after`-th time on."""
    original = stepper._decode
    seen = {"n": 0}

    def decode(codes, rows):
        if rows[slot]:
            seen["n"] += 1
            if seen["n"] >= after:
                raise RuntimeError(f"injected fault in slot {slot}")
        return original(codes, rows)

    stepper._decode = decode
    return seen


async def test_an_exception_in_one_slot_ends_that_call_only():
    engine = create_engine(ModelSource("tiny"), max_calls=3, sampling=GREEDY)
    await engine.start()
    alone = []
    call = await engine.open_call(seed=1)
    for frame in noise_frames(1, 12):
        alone.append(await call.process(frame))
    await call.close()

    calls = [await engine.open_call(seed=1) for _ in range(3)]
    decodes = fail_slot_decode(engine.stepper, calls[1].slot)
    results: list[list] = [[], [], []]
    errors: list[BaseException | None] = [None, None, None]
    for frame in noise_frames(1, 12):
        futures = []
        for i, c in enumerate(calls):
            try:
                futures.append(c.submit(frame))
            except Exception as exc:  # noqa: BLE001 - the failed call refuses further frames
                errors[i] = errors[i] or exc
                futures.append(None)
        for i, future in enumerate(futures):
            if future is None:
                continue
            try:
                results[i].append(await future)
            except Exception as exc:  # noqa: BLE001
                errors[i] = errors[i] or exc
    for c in calls:
        await c.close()
    await engine.stop()

    assert errors[0] is None and errors[2] is None
    assert "injected fault in slot 1" in str(errors[1]) and calls[1].error is not None
    assert decodes["n"] == 4  # the failed batch, the slot alone once more, and never again
    # The neighbours got every frame, and apart from the one frame the failed step made them hear
    # twice, exactly what a call alone gets.
    for i in (0, 2):
        assert len(results[i]) == 12
        assert [r.text for r in results[i][:3]] == [r.text for r in alone[:3]]
        assert sum(not r.silent for r in results[i]) == sum(not r.silent for r in alone)


async def test_a_failed_slot_ends_its_call_with_an_error_event_and_the_other_call_goes_on(tiny_server):
    stepper = tiny_server.engine.stepper
    first = asyncio.ensure_future(place_call(tiny_server.url, np.zeros(48000 * 3, np.float32) + 0.05, tail_s=0.5))
    while not tiny_server.service.sessions:
        await asyncio.sleep(0.01)
    doomed_slot = 1 - next(iter(tiny_server.service.sessions.values())).call.slot
    fail_slot_decode(stepper, doomed_slot)
    second = await place_call(tiny_server.url, np.zeros(48000 * 2, np.float32) + 0.05, tail_s=0.5)
    survivor = await first
    errors = [e for e in second.events if e["type"] == "error"]
    assert errors and "injected fault in slot" in errors[0]["reason"]
    assert second.end_reason.startswith("engine error: injected fault")
    assert survivor.end_reason in (None, "hung up") and not [e for e in survivor.events if e["type"] == "error"]
    assert len(survivor.audio) / 24000 > 2.5  # the whole call came back


async def test_a_device_error_is_fatal_it_ends_every_call_and_health_fails():
    engine = create_engine(ModelSource("tiny"), max_calls=2, sampling=GREEDY, cpu_threads=1, max_backlog_frames=25)
    server = await start_server(engine)
    original = engine.stepper.step
    steps = {"n": 0}

    def step(frames, rows, prompts=None):
        steps["n"] += 1
        if steps["n"] == 20:
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        return original(frames, rows, prompts)

    engine.stepper.step = step
    fatal_seen = asyncio.Event()
    engine.fatal_listeners.append(lambda exc: fatal_seen.set())
    calls = [asyncio.ensure_future(place_call(server.url, np.zeros(48000 * 4, np.float32) + 0.05, tail_s=0))
             for _ in range(2)]
    recordings = await asyncio.gather(*calls)
    await asyncio.wait_for(fatal_seen.wait(), 5)
    for recording in recordings:
        reasons = [e["reason"] for e in recording.events if e["type"] == "error"]
        assert reasons and "the model's device failed" in reasons[0] and "must restart" in reasons[0]
    assert isinstance(engine.fatal, DeviceFailed)
    async with aiohttp.ClientSession() as http:
        for path in ("/healthz", "/readyz"):
            async with http.get(server.url + path) as response:
                assert response.status == 503
                assert "device failed" in (await response.json())["reason"]
    with pytest.raises(EngineNotReady, match="device failed"):
        await engine.open_call()
    assert not server.service.sessions
    await stop_server(server)


class LoopErrors:
    """What asyncio reports through the loop's exception handler (Future exception was never retrieved, ...)
    while the test runs; each is still passed on to the default handler, so it is logged as before."""

    def __init__(self):
        self.messages: list[str] = []

    def __enter__(self) -> LoopErrors:
        self.loop = asyncio.get_running_loop()
        self.previous = self.loop.get_exception_handler()
        self.loop.set_exception_handler(self._record)
        return self

    def _record(self, loop, context: dict) -> None:
        self.messages.append(f"{context.get('message')}: {context.get('exception')!r}")
        loop.default_exception_handler(context)

    def __exit__(self, *exc) -> None:
        self.loop.set_exception_handler(self.previous)


@pytest.mark.parametrize("fault", ["device", "slot"])
async def test_after_an_engine_failure_every_pending_result_of_the_call_is_consumed(fault, monkeypatch):
    """The frames queued behind the one that failed fail too; none is left for asyncio to report as "never
    retrieved" (an ERROR line per frame, long after the call, whenever the garbage collector finds it).
    So that the collector can free the call within this test: it is made without the HTTP app (aiohttp caches
    its handlers), and the engine's log of the failure (whose traceback holds the call) is not kept by pytest."""
    from aiortc import RTCPeerConnection

    from server.media.audio_out import OutboundAudioTrack
    from server.media.ice import IceConfig
    from server.media.peer import CallSession

    engine = create_engine(ModelSource("tiny"), max_calls=1, sampling=GREEDY, cpu_threads=1, max_backlog_frames=25)
    await engine.start()
    original = engine.stepper.step
    steps = {"n": 0}

    def slow_then_failing_step(frames, rows, prompts=None):
        steps["n"] += 1
        if steps["n"] == 5:
            time.sleep(0.5)  # frames pile up behind this step, as behind a slow GPU
        if steps["n"] >= 6:
            if fault == "device":
                raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
            raise RuntimeError("injected fault in slot 0")
        return original(frames, rows, prompts)

    engine.stepper.step = slow_then_failing_step
    monkeypatch.setattr(logging.getLogger("server.engine.inference"), "propagate", False)
    with LoopErrors() as errors:
        voice = OutboundAudioTrack(sample_rate=24000, max_buffer_ms=5000)
        voice.push(np.zeros(24000 * 4, np.float32) + 0.05)
        caller = RTCPeerConnection()
        caller.addTrack(voice)
        await caller.setLocalDescription(await caller.createOffer())
        session = CallSession("faulty", engine, await engine.open_call(), IceConfig(), media_timeout=5.0)
        await caller.setRemoteDescription(await session.answer(caller.localDescription))
        await asyncio.wait_for(session.ended.wait(), 60)  # a hang guard, not a timing
        assert session.end_kind == "engine_error"
        assert ("device failed" if fault == "device" else "injected fault") in session.end_reason
        await caller.close()
        await engine.stop()
        del session, caller, voice, engine
        gc.collect()  # a failed future nobody awaited is reported when it is collected
    assert not [m for m in errors.messages if "never retrieved" in m], errors.messages


async def test_the_frames_in_the_step_that_kills_the_engine_fail_too():
    """The frames being stepped when the device (or the loop itself) dies are no longer in any queue: they
    must fail with the fatal error like the waiting ones, or their callers would wait for ever."""
    engine = create_engine(ModelSource("tiny"), max_calls=2, sampling=GREEDY)
    await engine.start()
    call = await engine.open_call(seed=1)

    def step(frames, rows, prompts=None):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    engine.stepper.step = step
    with pytest.raises(DeviceFailed, match="device failed"):
        await asyncio.wait_for(call.submit(noise_frames(1, 1)[0]), 60)  # a hang guard, not a timing
    assert isinstance(engine.fatal, DeviceFailed)
    await engine.stop()
    assert not engine.thread_alive


async def test_a_probe_given_up_before_it_ran_does_not_stop_the_engine():
    """/readyz gives up on a device probe after 2 s; the engine must neither run it later nor die of it."""
    import time

    engine = create_engine(ModelSource("tiny"), max_calls=1, sampling=GREEDY)
    await engine.start()
    busy = asyncio.ensure_future(engine.run_op(lambda: time.sleep(0.3)))  # the thread is in a long step
    await asyncio.sleep(0.05)
    probe = asyncio.ensure_future(engine.check_device())
    await asyncio.sleep(0.05)
    probe.cancel()
    await busy
    call = await asyncio.wait_for(engine.open_call(), 5)
    result = await asyncio.wait_for(call.process(noise_frames(1, 1)[0]), 5)
    assert result.audio.shape == (1920,) and engine.fatal is None and engine.thread_alive
    await call.close()
    await engine.stop()


def test_what_counts_as_a_fatal_device_error():
    assert is_device_fatal(torch.AcceleratorError("CUDA error: device-side assert triggered"))
    assert is_device_fatal(RuntimeError("CUDA error: out of memory"))
    assert not is_device_fatal(RuntimeError("injected fault in slot 1"))
    assert not is_device_fatal(ValueError("CUDA error in a message from a user"))


async def test_a_peer_whose_close_fails_still_has_its_transports_stopped(echo_server):
    """Fuzzing found offers that left aiortc's close() raising; the hang-up then stops what is left."""
    from aiortc import RTCPeerConnection
    from conftest import connect

    from server.media.audio_out import OutboundAudioTrack

    pc = RTCPeerConnection()
    pc.addTrack(OutboundAudioTrack(sample_rate=48000))
    session = await connect(echo_server, pc)

    async def broken_close():
        raise AttributeError("'NoneType' object has no attribute '_unregister_data_receiver'")

    session.pc.close = broken_close
    await asyncio.wait_for(session.hang_up("test"), 5)
    ice = [t.receiver.transport.transport for t in session.pc.getTransceivers()]
    assert ice and all(transport.state == "closed" for transport in ice)
    assert echo_server.engine.free_slots == 2 and not echo_server.service.sessions
    await pc.close()
