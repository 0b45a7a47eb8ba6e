"""Graceful drain and replica routing: what a rolling update and a load balancer need from one replica.

In-process servers with the echo engine and real aiortc callers; and the real `moshi-webrtc serve`
with media workers, stopped by SIGTERM as Kubernetes stops a pod.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from conftest import start_server, stop_server

from server.caller import CallRefused, place_call
from server.engine.setup import create_engine
from server.model.source import ModelSource
from signaling.app import SERVER_RESTART, SignalingConfig

BIN = Path(sys.executable).parent / "moshi-webrtc"
SEND_RATE = 48000


def speech(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SEND_RATE)) / SEND_RATE
    return (0.1 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


async def until(condition, poll_s: float = 0.05) -> None:
    """Wait for a condition another process or task makes true (no event to wait on exists there)."""
    while not await condition() if asyncio.iscoroutinefunction(condition) else not condition():
        await asyncio.sleep(poll_s)


@pytest.fixture
async def server():
    config = SignalingConfig(media_timeout_s=5.0, session_id_prefix="r2.", public_url="https://r2.calls.example.org",
                             max_calls_per_client=0)  # two callers from one address
    running = await start_server(create_engine(ModelSource("echo"), max_calls=2), config)
    yield running
    await stop_server(running)


async def test_a_draining_server_takes_no_new_calls_and_lets_the_current_ones_finish(server):
    first = asyncio.ensure_future(place_call(server.url, speech(3.0), tail_s=0.3))
    await until(lambda: server.service.sessions)
    draining = asyncio.ensure_future(server.service.drain(120))
    await until(lambda: server.service.draining)

    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/readyz") as response:
            assert response.status == 503 and "draining" in (await response.json())["reason"]
        offer = (await _aiortc_offer()).encode()
        async with http.post(server.url + "/whip", data=offer, headers={"Content-Type": "application/sdp"}) as r:
            assert r.status == 503 and r.headers["Retry-After"]
    with pytest.raises(CallRefused) as refused:
        await place_call(server.url, speech(0.5))
    assert refused.value.status == 503 and refused.value.retry_after

    recording = await first
    assert recording.end_reason != SERVER_RESTART and len(recording.audio) / 24000 > 2.5  # the call went on
    assert await draining == 0  # it ended by itself; the drain had nothing left to end


async def test_calls_still_up_when_the_drain_time_is_over_end_with_server_restart(server):
    calls = [asyncio.ensure_future(place_call(server.url, speech(30.0), tail_s=0.3)) for _ in range(2)]
    await until(lambda: len(server.service.sessions) == 2)
    assert await server.service.drain(0.5) == 2
    for recording in await asyncio.gather(*calls):
        assert recording.end_reason == SERVER_RESTART
        assert len(recording.audio) / 24000 < 25  # ended by the server, long before the caller was done
    assert not server.service.sessions and server.engine.free_slots == 2


async def test_session_ids_carry_the_replica_and_whip_location_is_its_public_url(server):
    recording = await place_call(server.url, speech(0.5), tail_s=0.2, hang_up="delete")
    assert recording.session_id.startswith("r2.")
    offer_sdp = await _aiortc_offer()
    async with aiohttp.ClientSession() as http:
        async with http.post(server.url + "/whip", data=offer_sdp.encode(),
                             headers={"Content-Type": "application/sdp"}) as response:
            assert response.status == 201
            location = response.headers["Location"]
        assert location.startswith("https://r2.calls.example.org/whip/r2.")
        session_id = location.rsplit("/", 1)[1]
        async with http.delete(f"{server.url}/whip/{session_id}") as response:
            assert response.status == 200
        async with http.post(server.url + "/offer", json={"sdp": offer_sdp, "type": "offer"}) as response:
            body = await response.json()
        assert body["session_url"] == f"https://r2.calls.example.org/sessions/{body['session_id']}"
        async with http.delete(f"{server.url}/sessions/{body['session_id']}") as response:
            assert response.status == 200
    assert session_id not in server.service.sessions


async def _aiortc_offer() -> str:
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_sigterm_drains_a_server_with_media_workers_then_exits_0():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(BIN), "serve", "--model", "echo", "--port", str(port), "--max-calls", "2", "--media-workers", "1",
         "--drain-seconds", "120", "--replica-id", "r7", "--ice-host-address", "127.0.0.1"],
        stderr=subprocess.PIPE, text=True, env=dict(os.environ, NO_TORCH_COMPILE="1"))
    log: list[str] = []
    ready = threading.Event()

    def read_log() -> None:
        for line in server.stderr:
            log.append(line)
            if "ready for" in line:
                ready.set()

    threading.Thread(target=read_log, daemon=True).start()
    try:
        assert await asyncio.get_running_loop().run_in_executor(None, ready.wait, 120), "".join(log)
        async with aiohttp.ClientSession() as http:
            async def status() -> dict:
                async with http.get(url + "/status") as response:
                    return await response.json()

            call = asyncio.ensure_future(place_call(url, speech(4.0), tail_s=0.3))

            async def one_call_up() -> bool:
                return (await status())["active_sessions"] == 1

            await until(one_call_up)
            server.send_signal(signal.SIGTERM)

            async def refusing() -> bool:
                async with http.get(url + "/readyz") as response:
                    return response.status == 503 and "draining" in (await response.json())["reason"]

            await until(refusing)
            with pytest.raises(CallRefused) as refused:
                await place_call(url, speech(0.5))
            assert refused.value.status == 503
            recording = await call
        assert recording.session_id.startswith("r7.w0.")
        assert recording.end_reason != SERVER_RESTART and len(recording.audio) / 24000 > 3.5
        code = await asyncio.get_running_loop().run_in_executor(None, server.wait, 60)
        assert code == 0, "".join(log)
        assert "draining" in "".join(log)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_replica_id_must_be_routable():
    done = subprocess.run([str(BIN), "serve", "--replica-id", "r1/../x"], capture_output=True, text=True)
    assert done.returncode == 2 and "replica id" in done.stderr
