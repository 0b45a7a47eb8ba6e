"""Mouth-to-ear latency on loopback with the `echo` engine: a click sent, the click heard back.

    ./run bench latency                 # 50 clicks, echo with Moshi's 1-frame delay and with none

A real aiortc caller sends clicks (5 ms bursts, 500 ms apart) through real
Opus to an in-process server; the server's pieces are timed as each click
passes them, and the caller notes when it hears the click back. Per click:

    inbound   caller's sender -> the server's receive path hands the click on, decoded (Opus, RTP, SRTP,
              the adaptive jitter buffer)
    framing   waiting for the 1920-sample (80 ms) engine frame to fill
    engine    submit -> result, with the echo's structural delay (Moshi's own frame of delay)
    pacing    result -> the outbound track hands the click's 20 ms frame to the sender
    outbound  server's sender -> caller's reader (Opus, RTP, the caller's jitter buffer)

Medians and p95 over all clicks; the two echo delays run side by side in one process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
from aiohttp import web  # noqa: E402
from aiortc import RTCPeerConnection, RTCSessionDescription  # noqa: E402

from server.engine.setup import create_engine  # noqa: E402
from server.media.audio_out import OutboundAudioTrack  # noqa: E402
from server.media.ice import IceConfig, use_host_addresses  # noqa: E402
from server.model.source import ModelSource  # noqa: E402
from signaling.app import SignalingService  # noqa: E402

CLICK_EVERY_S = 0.5
THRESHOLD = 0.2


def click_train(count: int, rate: int = 48000) -> np.ndarray:
    audio = np.zeros(int((count + 1) * CLICK_EVERY_S * rate), np.float32)
    burst = int(0.005 * rate)
    for i in range(count):
        start = int((i + 0.5) * CLICK_EVERY_S * rate) + (i * 397) % 960  # clicks land all over the frame
        audio[start : start + burst] = 0.8 * np.sign(np.sin(np.arange(burst) * 2 * np.pi * 1000 / rate))
    return audio


def loud(samples: np.ndarray) -> bool:
    return bool(np.abs(samples).max() > THRESHOLD)


class Clock:
    """Times at which each click passed one point: a click counts once, then needs silence to re-arm."""

    def __init__(self):
        self.times: list[float] = []
        self._armed_at = 0.0

    def see(self, samples: np.ndarray) -> None:
        now = time.monotonic()
        if loud(samples) and now >= self._armed_at:
            self.times.append(now)
            self._armed_at = now + CLICK_EVERY_S / 2


def instrument(session, clocks: dict[str, Clock]) -> None:
    """Wrap the server session's pieces so each click is timed as it passes."""
    framer = session.receiver.framer
    inbound_push, submit, outbound_recv = framer.push_samples, session.call.submit, session.outbound.recv

    def push(samples):
        clocks["server_in"].see(samples)
        return inbound_push(samples)

    def timed_submit(samples):
        clocks["framed"].see(samples)
        future = submit(samples)
        future.add_done_callback(lambda done: done.cancelled() or done.exception()
                                 or clocks["engine_out"].see(done.result().audio))
        return future

    async def recv():
        frame = await outbound_recv()
        clocks["server_out"].see(frame.to_ndarray().astype(np.float32) / 32768)
        return frame

    framer.push_samples = push
    session.call.submit = timed_submit
    session.outbound.recv = recv


async def measure(delay_frames: int, clicks: int) -> dict:
    engine = create_engine(ModelSource("echo"), max_calls=1, echo_delay_frames=delay_frames)
    await engine.start()
    service = SignalingService(engine)
    runner = web.AppRunner(service.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    clocks = {name: Clock() for name in ("sent", "server_in", "framed", "engine_out", "server_out", "heard")}
    pc = RTCPeerConnection(IceConfig().rtc_configuration())
    voice = OutboundAudioTrack(sample_rate=48000, max_buffer_ms=120_000)
    voice.push(click_train(clicks))
    voice_recv = voice.recv

    async def sent_recv():
        frame = await voice_recv()
        clocks["sent"].see(frame.to_ndarray().astype(np.float32) / 32768)
        return frame

    voice.recv = sent_recv
    pc.addTrack(voice)
    readers = []

    @pc.on("track")
    def on_track(track):
        async def read():
            while True:
                frame = await track.recv()
                clocks["heard"].see(frame.to_ndarray().astype(np.float32) / 32768)

        readers.append(asyncio.ensure_future(read()))

    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as response:
            answer = await response.json()
        instrument(service.sessions[answer["session_id"]], clocks)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        await asyncio.sleep((clicks + 1) * CLICK_EVERY_S + 0.5)  # the measurement window
        async with http.delete(f"{url}/sessions/{answer['session_id']}") as response:
            await response.read()
    for reader in readers:
        reader.cancel()
    await pc.close()
    await runner.cleanup()
    await engine.stop()

    counts = {name: len(clock.times) for name, clock in clocks.items()}
    n = min(counts.values())
    t = {name: np.array(clock.times[:n]) for name, clock in clocks.items()}
    parts = {
        "inbound": t["server_in"] - t["sent"],
        "framing": t["framed"] - t["server_in"],
        "engine": t["engine_out"] - t["framed"],
        "pacing": t["server_out"] - t["engine_out"],
        "outbound": t["heard"] - t["server_out"],
        "total": t["heard"] - t["sent"],
    }
    return {
        "echo_delay_frames": delay_frames,
        "clicks_matched": n,
        "clicks_seen": counts,
        "ms": {
            name: {"median": round(1000 * statistics.median(v), 1), "p95": round(1000 * float(np.percentile(v, 95)), 1)}
            for name, v in parts.items()
        },
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clicks", type=int, default=50)
    args = parser.parse_args()
    use_host_addresses(["127.0.0.1"])
    for delay in (1, 0):
        print(json.dumps(await measure(delay, args.clicks)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
