"""When the model falls behind, the delay stays bounded, drops are counted and reported, and the
call recovers. The slow step is injected (the only fault here that cannot be produced otherwise)."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
from aiortc import RTCPeerConnection
from conftest import connect, start_server, stop_server

from server.caller import record_track
from server.engine.setup import create_engine
from server.media.audio_out import OutboundAudioTrack
from server.media.latency_probe import BurstPlan
from server.model.source import ModelSource

PLAN = BurstPlan(count=30, every_s=1.0)


async def test_a_slow_model_keeps_the_delay_bounded_and_the_call_recovers():
    engine = create_engine(ModelSource("echo"), max_calls=1, max_backlog_frames=3)
    server = await start_server(engine)
    stepper = engine.stepper
    original_step = stepper.step
    slow = {"on": False}

    def step(frames, rows):  # runs on the inference thread: 200 ms per 80 ms frame while slow
        if slow["on"]:
            time.sleep(0.2)
        return original_step(frames, rows)

    stepper.step = step

    pc = RTCPeerConnection()
    voice = OutboundAudioTrack(sample_rate=48000, max_buffer_ms=60_000)
    voice.push(PLAN.audio())
    pc.addTrack(voice)
    channel = pc.createDataChannel("events")
    events: list[dict] = []
    channel.on("message", lambda m: events.append(json.loads(m)))
    chunks: list[np.ndarray] = []
    arrivals: list[float] = []

    pc.on("track", lambda track: asyncio.ensure_future(record_track(track, chunks, arrivals)))

    session = await connect(server, pc)
    # The scenario's timeline: 8 s normal, 12 s with every step taking 200 ms, then normal again.
    await asyncio.sleep(8.0)
    slow["on"] = True
    await asyncio.sleep(12.0)
    slow["on"] = False
    await asyncio.sleep(PLAN.count * PLAN.every_s + 1.5 - 20.0)
    summary = session.summary()
    await pc.close()
    await stop_server(server)

    delays = PLAN.delays(chunks, arrivals, voice.clock_start)
    normal = [d for i, d in delays.items() if i < 7]
    during = [d for i, d in delays.items() if 9 <= i < 19]
    after = [d for i, d in delays.items() if i >= 23]
    assert len(normal) >= 6 and len(after) >= 6 and during, delays
    assert summary["frames_dropped"] > 0  # the injected slowness was real: the model fell behind
    # Bounded: the queues cap what the slowness can add (3 input frames, the 400 ms output buffer, a slow
    # step: under a second), where unbounded queues would reach ~18 s here. Measured against this run's
    # own normal delay, with a wide margin, so a loaded machine does not decide it.
    assert max(delays.values()) < max(normal) + 2.0
    # Recovered: once the model keeps pace again the delay comes back down from its peak (the standing
    # delay is shed a little each second, so it need not be back to normal by the end of the call).
    assert max(after[-3:]) < max(during)
    drop_events = [e for e in events if e["type"] == "drops"]
    assert drop_events and drop_events[-1]["input_frames"] > 0
