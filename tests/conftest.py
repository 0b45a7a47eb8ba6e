"""Shared helpers for the engine tests: real moshi classes, the built-in tiny model, CPU only."""

from __future__ import annotations

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # skip the slow first-step compile on CPU
os.environ.setdefault("NO_CUDA_GRAPH", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from server.engine import Engine, FrameResult  # noqa: E402
from server.engine.setup import create_engine  # noqa: E402
from server.model.moshi_step import GREEDY  # noqa: E402
from server.model.source import ModelSource  # noqa: E402

FRAME = 1920
SAMPLE_RATE = 24000


def noise_frames(seed: int, count: int, level: float = 0.1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(level * rng.standard_normal(FRAME)).astype(np.float32) for _ in range(count)]


def tone_frames(hz: float, count: int, dbfs: float = -20.0) -> list[np.ndarray]:
    amplitude = 10 ** (dbfs / 20) * np.sqrt(2)  # a sine of this amplitude has RMS at `dbfs`
    t = np.arange(count * FRAME) / SAMPLE_RATE
    return list((amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32).reshape(count, FRAME))


async def run_call(
    engine: Engine, frames: list[np.ndarray], seed: int | None = 1234, prompt=None
) -> list[FrameResult]:
    """One call, frame by frame; with a persona `prompt`, the frames start once the model has heard it."""
    call = await engine.open_call(seed=seed, prompt=prompt)
    try:
        await call.prompt_done
        return [await call.process(frame) for frame in frames]
    finally:
        await call.close()


def spy(monkeypatch, owner: type, name: str, record) -> None:
    """Wrap `owner.name` for this test: each call runs as before, then `record(self, args, result)`."""
    original = getattr(owner, name)

    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        record(self, args, result)  # the positional arguments
        return result

    monkeypatch.setattr(owner, name, wrapper)


def audio_of(results: list[FrameResult]) -> np.ndarray:
    return np.concatenate([r.audio for r in results])


def texts_of(results: list[FrameResult]) -> list[str | None]:
    return [r.text for r in results]


@pytest.fixture
async def tiny_engine():
    """A started 3-slot tiny engine with greedy decoding."""
    engine = create_engine(ModelSource("tiny"), max_calls=3, sampling=GREEDY)
    await engine.start()
    yield engine
    await engine.stop()


@pytest.fixture
async def sampling_engine():
    """A started 3-slot tiny engine that samples (moshi's default temperatures and top-k)."""
    engine = create_engine(ModelSource("tiny"), max_calls=3)
    await engine.start()
    yield engine
    await engine.stop()


# -- a real server on loopback ----------------------------------------------------------------

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from server.media.ice import use_host_addresses  # noqa: E402
from signaling.app import SignalingConfig, SignalingService  # noqa: E402


@pytest.fixture(autouse=True)
def loopback_ice():
    """ICE host candidates on 127.0.0.1 only: test traffic never leaves loopback."""
    use_host_addresses(["127.0.0.1"])
    yield
    use_host_addresses(None)


class RunningServer:
    def __init__(self, engine: Engine, service: SignalingService, runner: web.AppRunner, url: str):
        self.engine, self.service, self.runner, self.url = engine, service, runner, url


async def start_server(engine: Engine, config: SignalingConfig | None = None, start_engine: bool = True):
    if start_engine:
        await engine.start()
    # Test callers all come from 127.0.0.1: no per-client share unless a test's own config sets one
    # (tests/test_fair_share.py tests the share; the product's default is a quarter of the lines).
    service = SignalingService(engine, config or SignalingConfig(media_timeout_s=5.0, max_calls_per_client=0))
    runner = await service.start_runner()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return RunningServer(engine, service, runner, f"http://127.0.0.1:{port}")


async def connect(server: RunningServer, pc):
    """Offer from a hand-built aiortc peer to the server's /offer; apply the answer; return the session."""
    from aiortc import RTCSessionDescription

    await pc.setLocalDescription(await pc.createOffer())
    offer = {"sdp": pc.localDescription.sdp, "type": "offer"}
    async with aiohttp.ClientSession() as http, http.post(f"{server.url}/offer", json=offer) as response:
        answer = await response.json()
    session = server.service.sessions[answer["session_id"]]
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    return session


async def stop_server(server: RunningServer) -> None:
    await server.runner.cleanup()
    await server.engine.stop()


@pytest.fixture
async def tiny_server():
    # As `serve` does on a CPU: one core left to the event loop. A deep backlog, so that a busy test
    # machine slows these calls down instead of dropping frames (the bound has its own test).
    engine = create_engine(ModelSource("tiny"), max_calls=2, sampling=GREEDY, cpu_threads=1, max_backlog_frames=25)
    server = await start_server(engine)
    yield server
    await stop_server(server)


@pytest.fixture
async def echo_server():
    server = await start_server(create_engine(ModelSource("echo"), max_calls=2))
    yield server
    await stop_server(server)


# -- a real coturn on 127.0.0.1 -------------------------------------------------------------------

import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402

TURNSERVER = shutil.which("turnserver")
TURN_SECRET = "correct-horse-battery-staple"


class Coturn:
    def __init__(self, port: int, process: subprocess.Popen, log: list[str]):
        self.port, self.process, self.log = port, process, log
        self.url = f"turn:127.0.0.1:{port}?transport=udp"

    def allocations(self) -> list[str]:
        return [line for line in self.log if "ALLOCATE processed, success" in line]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def coturn(tmp_path):
    port = free_udp_port()
    process = subprocess.Popen(
        [TURNSERVER, "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", f"--listening-port={port}",
         "--min-port=49200", "--max-port=49400", "--use-auth-secret", f"--static-auth-secret={TURN_SECRET}",
         "--realm=moshi.test", "--no-tls", "--no-dtls", "--allow-loopback-peers", "--no-cli", "--fingerprint",
         "--log-file=stdout", "--simple-log", "--verbose", f"--pidfile={tmp_path}/turn.pid", f"--db={tmp_path}/turndb"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    log: list[str] = []
    for line in process.stdout:  # wait for coturn to say it listens
        log.append(line)
        if "UDP listener opened on" in line:
            break
    threading.Thread(target=lambda: [log.append(line) for line in process.stdout], daemon=True).start()
    yield Coturn(port, process, log)
    process.terminate()
    process.wait(timeout=10)


