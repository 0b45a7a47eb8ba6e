"""No more than real time: whatever a caller sends, its slot gets at most one frame per frame of time.

The gate alone on a manual clock, then a real aiortc caller whose track is read as fast as aiortc's
sender asks (no pacing: 20 ms of audio every few ms, about ten times real time) against a server whose
engine counts what it is given, beside an honest caller on the same server.
"""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from attackers import UnpacedTone
from conftest import start_server, stop_server

from server.caller import place_call
from server.engine.setup import create_engine
from server.media.real_time import FRAME_SLACK, RealTimeGate
from server.model.source import ModelSource

FRAME_S = 0.08


def test_a_stream_at_real_time_passes_whole_jitter_and_stall_bursts_included():
    gate = RealTimeGate(FRAME_S)
    rng = np.random.default_rng(3)
    times = np.arange(200) * FRAME_S + rng.uniform(-0.04, 0.04, 200)  # jitter of half a frame either way
    times[100:105] = times[105]  # a 400 ms stall: five frames come at once after it
    assert all(gate.admit(t) for t in np.sort(times)) and gate.refused == 0


def test_a_stream_faster_than_real_time_gets_real_time_and_a_quiet_spell_saves_up_only_the_slack():
    gate = RealTimeGate(FRAME_S)
    admitted = sum(gate.admit(i * FRAME_S / 10) for i in range(1000))  # 10x for 8 s
    assert abs(admitted - (100 + FRAME_SLACK)) <= 1  # one a frame of time, and the slack
    assert gate.refused == 1000 - admitted
    quiet_until = 60.0  # a minute of nothing, then a blast
    burst = sum(gate.admit(quiet_until + i * 1e-4) for i in range(100))
    assert burst == 1 + FRAME_SLACK


async def test_a_caller_sending_ten_times_real_time_is_stepped_at_real_time_and_counted():
    server = await start_server(create_engine(ModelSource("echo"), max_calls=2, max_backlog_frames=50))
    loop = asyncio.get_running_loop()
    attacker = RTCPeerConnection()
    attacker.addTrack(UnpacedTone(gap_s=0.002))
    try:
        await attacker.setLocalDescription(await attacker.createOffer())
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as http:
            offer = {"sdp": attacker.localDescription.sdp, "type": "offer"}  # from another client than the honest
            async with http.post(f"{server.url}/offer", json=offer) as response:
                answer = await response.json()
            await attacker.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
            session = server.service.sessions[answer["session_id"]]
            honest = asyncio.ensure_future(place_call(server.url, np.zeros(48000 * 3, np.float32) + 0.05,
                                                      tail_s=0.3))
            while session.receiver.stats.packets < 300:  # about a second of its time, six of its audio
                await asyncio.sleep(0.05)
            while session.receiver.stats.packets < 600:  # twelve seconds of its audio
                await asyncio.sleep(0.05)
            elapsed = loop.time() - session.stats.connected_at
            frames = session.call.stats.frames_in
            stats = session.receiver.stats
            assert frames <= elapsed / FRAME_S + 1 + FRAME_SLACK  # however fast or slow this machine ran it
            assert stats.frames_over_real_time >= 1
            recording = await honest
            assert recording.end_reason in (None, "hung up")
            async with http.get(f"{server.url}/metrics") as response:
                metrics = await response.text()
            line = next(m for m in metrics.splitlines() if m.startswith("moshi_receive_frames_over_real_time_total"))
            assert float(line.split()[-1]) >= 1
    finally:
        await attacker.close()
        await stop_server(server)
