"""Calls served by media worker processes around the one engine: routing, admission, crashes.

Real aiortc callers call the front; the front forwards to spawned worker
processes that run the real peers and reach the engine over its socket. A
worker is killed with SIGKILL mid-call, and the whole server (front and engine)
is killed under its workers, as a crash would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from server.audio.inbound import InboundAudio
from server.engine.setup import create_engine
from server.media.audio_out import OutboundAudioTrack
from server.media.ice import IceConfig
from server.media.workers import MediaWorkers
from server.model.source import ModelSource
from server.worker import worker_main
from signaling.app import SignalingConfig, SignalingService

ROOT = Path(__file__).resolve().parent.parent


class Front:
    def __init__(self, engine, workers: MediaWorkers | None, runner: web.AppRunner, url: str):
        self.engine, self.workers, self.runner, self.url = engine, workers, runner, url


async def start_front(max_calls: int, worker_count: int, config: SignalingConfig | None = None) -> Front:
    """The echo engine and the signaling front on loopback; `worker_count` 0: media in the front's process."""
    engine = create_engine(ModelSource("echo"), max_calls=max_calls, echo_delay_frames=1)
    await engine.start()
    config = config or SignalingConfig(media_timeout_s=5.0, max_calls_per_client=0)  # callers share 127.0.0.1
    workers = None
    if worker_count:
        workers = MediaWorkers(engine, worker_count, config, worker_main, host_addresses=["127.0.0.1"],
                               log_level="WARNING")
        await workers.start()
    runner = await SignalingService(engine, config, workers=workers).start_runner()
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    await web.SockSite(runner, listening).start()
    return Front(engine, workers, runner, f"http://127.0.0.1:{listening.getsockname()[1]}")


async def stop_front(front: Front) -> None:
    if front.workers is not None:
        await front.workers.stop()
    await front.runner.cleanup()
    await front.engine.stop()


class Caller:
    """A real aiortc caller sending a steady tone; `heard(n)` resolves once n loud reply frames came back."""

    def __init__(self, hz: float = 440.0):
        self.pc = RTCPeerConnection(IceConfig().rtc_configuration())
        self.voice = OutboundAudioTrack(sample_rate=48000, max_buffer_ms=60_000)
        t = np.arange(48000 * 50) / 48000
        self.voice.push((0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32))
        self.pc.addTrack(self.voice)
        self.events: list[dict] = []
        self.ended = asyncio.Event()
        channel = self.pc.createDataChannel("events")
        channel.on("message", self._on_event)
        self.loud = 0
        self.loud_audio: list[np.ndarray] = []  # 20 ms chunks of the reply, at 24 kHz, above the noise
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self.pc.on("track", lambda track: asyncio.ensure_future(self._listen(track)))
        self.session_id = ""

    def _on_event(self, message: str) -> None:
        import json

        self.events.append(json.loads(message))
        if self.events[-1].get("type") in ("bye", "error"):
            self.ended.set()

    async def _listen(self, track) -> None:
        inbound = InboundAudio(sample_rate=24000, frame_size=480)
        try:
            while True:
                for chunk in inbound.push(await track.recv()):
                    if float(np.sqrt(np.mean(chunk**2))) > 0.05:
                        self.loud += 1
                        self.loud_audio.append(chunk)
                        for waiter in [w for w in self._waiters if self.loud >= w[0]]:
                            self._waiters.remove(waiter)
                            waiter[1].set_result(None)
        except MediaStreamError:
            return

    async def heard(self, more: int) -> None:
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((self.loud + more, future))
        await future

    async def call(self, http: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = {"sdp": self.pc.localDescription.sdp, "type": "offer"}
        response = await http.post(f"{url}/offer", json=offer)
        if response.status == 200:
            answer = await response.json()
            self.session_id = answer["session_id"]
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        return response


async def answered(http: aiohttp.ClientSession, front: Front, callers: list[Caller]) -> None:
    for caller in callers:
        assert (await caller.call(http, front.url)).status == 200


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0] == name)


async def test_calls_run_in_workers_with_exact_admission_and_routing_by_session():
    front = await start_front(max_calls=2, worker_count=2)
    callers = [Caller(), Caller(), Caller()]
    try:
        async with aiohttp.ClientSession() as http:
            await answered(http, front, callers[:2])
            ids = [caller.session_id for caller in callers[:2]]
            assert sorted(i.split(".")[0] for i in ids) == ["w0", "w1"]  # one call on each worker
            busy = await callers[2].call(http, front.url)
            assert busy.status == 503 and "Retry-After" in busy.headers  # slots are global: 2 in all
            await asyncio.wait_for(asyncio.gather(*(c.heard(10) for c in callers[:2])), 60)

            for session_id in ids:
                async with http.get(f"{front.url}/sessions/{session_id}") as response:
                    assert response.status == 200 and (await response.json())["session_id"] == session_id
            async with http.get(f"{front.url}/sessions/w1.nosuchcall") as response:
                assert response.status == 404
            async with http.get(f"{front.url}/metrics") as response:
                text = await response.text()
            assert metric(text, "moshi_calls_active") == 2 and metric(text, "moshi_media_workers") == 2
            assert metric(text, "moshi_calls_rejected_total{reason=\"busy\"}") == 1
            assert metric(text, "moshi_engine_steps_total") > 0

            async with http.delete(f"{front.url}/sessions/{ids[0]}") as response:
                assert response.status == 200
            await asyncio.wait_for(callers[0].ended.wait(), 30)
            assert front.workers.engine.free_slots == 1  # the worker's DELETE returned once the slot was free
    finally:
        for caller in callers:
            await caller.pc.close()
        await stop_front(front)


async def test_a_killed_worker_ends_only_its_calls_frees_their_slots_and_is_replaced():
    front = await start_front(max_calls=2, worker_count=2)
    callers = [Caller(), Caller(), Caller()]
    try:
        async with aiohttp.ClientSession() as http:
            await answered(http, front, callers[:2])
            await asyncio.wait_for(asyncio.gather(*(c.heard(5) for c in callers[:2])), 60)
            victim, survivor = callers[:2]
            victim_worker = front.workers.holding(victim.session_id)
            replaced = asyncio.Event()
            front.workers.host.link_listeners.append(lambda link: replaced.set())
            os.kill(victim_worker.process.pid, signal.SIGKILL)

            await asyncio.wait_for(replaced.wait(), 60)  # a new worker connected in its place
            assert front.workers.restarts == 1 and front.workers.engine.free_slots == 1
            assert front.workers.host.stats.workers_lost == 1
            await asyncio.wait_for(survivor.heard(25), 30)  # the other worker's call went on throughout
            async with http.get(f"{front.url}/sessions/{victim.session_id}") as response:
                assert response.status == 404
            assert (await callers[2].call(http, front.url)).status == 200  # the freed slot takes a new call
            await asyncio.wait_for(callers[2].heard(5), 60)
    finally:
        for caller in callers:
            await caller.pc.close()
        await stop_front(front)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
async def test_when_the_engine_process_dies_every_call_ends_with_the_reason_and_workers_exit():
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--model", "echo", "--port", str(port), "--max-calls", "2",
         "--media-workers", "2", "--ice-host-address", "127.0.0.1", "--log-level", "WARNING"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    caller = Caller()
    try:
        async with aiohttp.ClientSession() as http:
            while True:  # the server is another process: its readiness is only visible over HTTP
                try:
                    async with http.get(f"{url}/readyz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert server.poll() is None, server.stderr.read().decode()
                await asyncio.sleep(0.2)
            assert (await caller.call(http, url)).status == 200
        await asyncio.wait_for(caller.heard(5), 60)
        workers = children_of(server.pid)
        assert len(workers) >= 2
        server.kill()  # the front, and the engine in it, die at once
        await asyncio.wait_for(caller.ended.wait(), 30)
        assert any("engine" in event.get("reason", "") for event in caller.events), caller.events
        for pid in workers:  # the workers notice and exit on their own
            while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
                await asyncio.sleep(0.1)
    finally:
        await caller.pc.close()
        if server.poll() is None:
            server.kill()
        server.wait()


def dominant_hz(chunks: list[np.ndarray], rate: int = 24000) -> float:
    audio = np.concatenate(chunks)
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / rate)[int(np.argmax(spectrum))])


async def test_callers_on_different_workers_each_hear_only_their_own_voice():
    front = await start_front(max_calls=4, worker_count=2)
    tones = [330.0, 440.0, 550.0, 660.0]
    callers = [Caller(hz) for hz in tones]
    try:
        async with aiohttp.ClientSession() as http:
            await answered(http, front, callers)
            assert sorted(c.session_id.split(".")[0] for c in callers) == ["w0", "w0", "w1", "w1"]
            await asyncio.wait_for(asyncio.gather(*(c.heard(40) for c in callers)), 120)
        for caller, hz in zip(callers, tones, strict=True):
            assert abs(dominant_hz(caller.loud_audio[-40:]) - hz) < 15, (hz, caller.session_id)
    finally:
        for caller in callers:
            await caller.pc.close()
        await stop_front(front)


async def test_a_slow_model_drops_frames_for_calls_in_workers_says_so_and_the_call_recovers():
    """The engine (in the front) falls behind: the delay stays bounded by dropping the oldest frames, the
    caller in a worker is told (`drops`), and once the model keeps pace again the call goes on."""
    front = await start_front(max_calls=1, worker_count=1)
    stepper = front.workers.engine.stepper
    original_step = stepper.step
    slow = threading.Event()

    def step(frames, rows, prompts=None):  # the inference thread: 200 ms per 80 ms frame while slow
        if slow.is_set():
            time.sleep(0.2)
        return original_step(frames, rows, prompts)

    stepper.step = step
    caller = Caller()
    try:
        async with aiohttp.ClientSession() as http:
            await answered(http, front, [caller])
            await asyncio.wait_for(caller.heard(10), 60)
            slow.set()
            await asyncio.wait_for(_until(lambda: any(e["type"] == "drops" for e in caller.events)), 60)
            slow.clear()
            await asyncio.wait_for(caller.heard(25), 60)  # 0.5 s more of its voice back: the call recovered
            async with http.get(f"{front.url}/sessions/{caller.session_id}") as response:
                summary = await response.json()
        assert summary["frames_dropped"] > 0 and not summary["ended"]
        assert front.workers.engine.stats.frames_dropped == summary["frames_dropped"]
    finally:
        await caller.pc.close()
        await stop_front(front)


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.05)
