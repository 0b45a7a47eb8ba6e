"""The process boundary on one loop: the engine host serving RemoteEngines and a misbehaving worker.

The worker side here is the real RemoteEngine over a real Unix socket; the
"stuck" and "confused" workers are raw sockets, because a real worker cannot be
made to stop reading or to name another worker's call on purpose.
"""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest

from server.engine import channel, wire
from server.engine.host import EngineHost
from server.engine.remote import EngineLost, RemoteEngine
from server.engine.setup import create_engine
from server.model.source import ModelSource

FRAME = 1920


@pytest.fixture
async def host(tmp_path):
    engine = create_engine(ModelSource("echo"), max_calls=2, echo_delay_frames=1)
    await engine.start()
    host = EngineHost(engine, str(tmp_path / "engine.sock"))
    await host.start()
    yield host
    await host.stop()
    await engine.stop()


def raw_worker(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    sock.setblocking(False)
    sock.send(wire.control_message("hello", index=9, http_port=1, pid=0))
    return sock


async def receive_control(sock: socket.socket, kind: str) -> dict:
    loop = asyncio.get_running_loop()
    while True:
        message = await loop.sock_recv(sock, wire.MAX_MESSAGE)
        if message and message[0] == wire.CONTROL and (fields := wire.parse_control(message))["kind"] == kind:
            return fields


async def test_a_remote_call_echoes_in_order_and_frees_its_slot_on_close(host):
    remote = RemoteEngine(host.path)
    await remote.connect(index=0, http_port=1)
    assert (remote.frame_size, remote.sample_rate, remote.batch_size, remote.free_slots) == (FRAME, 24000, 2, 2)
    call = await remote.open_call(seed=7)
    assert host.engine.free_slots == 1 and call.seed == 7
    frames = [np.full(FRAME, 0.01 * (i + 1), np.float32) for i in range(6)]
    results = [await call.process(frame) for frame in frames]
    assert [round(float(r.audio[0]), 4) for r in results] == [0.0, 0.01, 0.02, 0.03, 0.04, 0.05]  # one frame late
    assert call.stats.frames_out == 6 and results[1].input_rms == pytest.approx(0.02, rel=1e-3)
    await call.close()
    await asyncio.wait_for(_until(lambda: host.engine.free_slots == 2), 10)
    remote.close()


async def test_admission_is_exact_across_workers(host):
    first, second = RemoteEngine(host.path), RemoteEngine(host.path)
    await first.connect(index=0, http_port=1)
    await second.connect(index=1, http_port=2)
    calls = [await first.open_call(), await second.open_call()]
    from server.engine import EngineFull

    with pytest.raises(EngineFull):
        await first.open_call()
    await calls[1].close()
    third = await first.open_call()  # the slot the other worker gave back
    assert third.slot == calls[1].slot
    for remote in (first, second):
        remote.close()


async def test_a_worker_that_stops_reading_loses_only_its_own_results(host, monkeypatch):
    monkeypatch.setattr(channel, "BUFFER_BYTES", 32 * 1024)  # a few results fill it
    good = RemoteEngine(host.path)
    await good.connect(index=0, http_port=1)
    call = await good.open_call()
    stuck = raw_worker(host.path)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    stuck.send(wire.control_message("open", request=1, seed=None, persona=None))
    stuck_call = (await receive_control(stuck, "opened"))["call_id"]  # from now on it reads nothing
    heard = []
    for i in range(60):
        stuck.send(wire.frame_message(stuck_call, i, np.full(FRAME, 0.5, np.float32)))
        stuck.send(wire.frame_message(call.call_id, 10_000 + i, np.full(FRAME, 0.9, np.float32)))  # not its call
        heard.append(await call.process(np.full(FRAME, 0.1, np.float32)))
    assert len(heard) == 60 and all(float(np.abs(r.audio).max()) <= 0.1 + 1e-6 for r in heard)
    assert host.stats.results_dropped > 0  # the stuck worker's, not the good one's
    assert host.stats.foreign_frames == 60
    stuck.send(b"\x09 not a message")
    await call.process(np.full(FRAME, 0.1, np.float32))  # the good worker goes on
    assert host.stats.bad_messages == 1
    stuck.close()
    await asyncio.wait_for(_until(lambda: host.engine.free_slots == 1), 10)  # its call's slot is free again
    await call.close()
    good.close()


async def test_when_the_engine_goes_every_remote_call_fails_with_the_reason(host):
    remote = RemoteEngine(host.path)
    lost = asyncio.Event()
    remote.engine_lost.append(lost.set)
    await remote.connect(index=0, http_port=1)
    call = await remote.open_call()
    await call.process(np.zeros(FRAME, np.float32))
    await host.stop()
    await asyncio.wait_for(lost.wait(), 10)
    with pytest.raises(EngineLost, match="engine process stopped"):
        await call.process(np.zeros(FRAME, np.float32))
    from server.engine import EngineNotReady

    with pytest.raises(EngineNotReady):
        await remote.open_call()


async def _until(condition) -> None:
    """Wait for a condition the engine's own thread changes (no event to wait on across the thread)."""
    while not condition():
        await asyncio.sleep(0.01)
