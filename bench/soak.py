"""Soak: hundreds of call set-ups and hang-ups, some abrupt, then count what is left over.

    ./run bench soak                       # 500 calls, 4 at a time, echo engine
    ./run bench soak --calls 200 --model tiny

Real aiortc callers on loopback against an in-process server. Calls end four
ways, in turn: DELETE (a hang-up), the caller closing its peer without a word,
the caller going quiet (its audio stops; the media timeout finds it away, and the call ends when the
resume window, 1 s here, has passed without it: `resume_expired`), and
the caller closing its peer before ICE even connects (the media timeout ends it
as `ice_failed`: nothing ever connected). Before and after (a warm-up
of 20 calls first, so that one-time allocations do not count as growth) it
records the process's resident memory, open file descriptors, threads, asyncio
tasks, live RTCPeerConnection objects, sessions and free call slots.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
from aiortc import RTCPeerConnection, RTCSessionDescription  # noqa: E402

from server.media.audio_out import OutboundAudioTrack  # noqa: E402
from server.media.ice import IceConfig  # noqa: E402

ENDINGS = ("delete", "close", "quiet", "early_close")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def ended_by_reason(service) -> dict[str, int]:
    return {key[0]: int(child._value.get()) for key, child in dict(service.metrics.calls_ended._metrics).items()}


def census(service) -> dict:
    """What the process holds right now."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance over every object touches deprecated torch attributes
        warnings.simplefilter("ignore")
        peers = sum(isinstance(o, RTCPeerConnection) for o in gc.get_objects())
    return {
        "rss_mib": round(rss_mib(), 1),
        "fds": len(os.listdir("/proc/self/fd")),
        # The event loop's default executor keeps a bounded pool of worker threads ("asyncio_N"): not per call.
        "threads": sum(not t.name.startswith("asyncio_") for t in threading.enumerate()),
        "executor_threads": sum(t.name.startswith("asyncio_") for t in threading.enumerate()),
        "tasks": len(asyncio.all_tasks()),
        "peer_connections": peers,
        "sessions": len(service.sessions),
        "free_slots": service.engine.free_slots,
    }


async def one_call(url: str, http: aiohttp.ClientSession, ending: str) -> str:
    pc = RTCPeerConnection(IceConfig().rtc_configuration())
    voice = OutboundAudioTrack(sample_rate=48000, max_buffer_ms=2000, end_when_drained=ending == "quiet")
    voice.push((0.1 * np.sin(np.arange(14400) * 2 * np.pi * 300 / 48000)).astype(np.float32))
    pc.addTrack(voice)
    pc.createDataChannel("events")
    connected = asyncio.Event()
    pc.on("connectionstatechange", lambda: connected.set() if pc.connectionState == "connected" else None)
    try:
        await pc.setLocalDescription(await pc.createOffer())
        offer = {"sdp": pc.localDescription.sdp, "type": "offer"}
        async with http.post(f"{url}/offer", json=offer) as response:
            answer = await response.json()
            if response.status != 200:
                return f"refused {response.status}"
        if ending == "early_close":
            return ending  # the peer closes below before it ever connects
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        await asyncio.wait_for(connected.wait(), 10)
        await asyncio.sleep(0.3)
        if ending == "delete":
            async with http.delete(f"{url}/sessions/{answer['session_id']}") as response:
                await response.read()
        elif ending == "quiet":
            await asyncio.sleep(1.6)  # the track ended: nothing more arrives; the server's timeout ends the call
        return ending
    finally:
        await pc.close()


async def soak(url: str, calls: int, concurrency: int) -> dict:
    """Place `calls` calls, `concurrency` at a time, ending them in turn each of the four ways."""
    outcomes: dict[str, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(calls):
        queue.put_nowait(i)

    async def worker(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            while True:
                try:
                    outcome = await one_call(url, http, ENDINGS[i % len(ENDINGS)])
                except Exception as exc:  # noqa: BLE001 - counted, not fatal: the soak goes on
                    outcome = f"failed {type(exc).__name__}"
                if outcome != "refused 503":
                    break
                outcomes["busy, retried"] = outcomes.get("busy, retried", 0) + 1
                await asyncio.sleep(0.2)  # a slot is still held by a call ending on its timeout
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return outcomes


async def settle(service, timeout_s: float = 15.0) -> None:
    """Wait until every session has ended (the quiet ones end when their resume window passes)."""
    deadline = time.monotonic() + timeout_s
    while service.sessions and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # closed transports finish their last callbacks


async def run(model: str, calls: int, concurrency: int, warmup: int) -> dict:
    from aiohttp import web

    from server.engine.setup import create_engine
    from server.media.ice import use_host_addresses
    from server.model.source import ModelSource
    from signaling.app import SignalingConfig, SignalingService

    use_host_addresses(["127.0.0.1"])
    engine = create_engine(ModelSource(model), max_calls=concurrency, cpu_threads=1)
    await engine.start()
    service = SignalingService(engine, SignalingConfig(media_timeout_s=1.0, resume_window_s=1.0,
                                                     max_offers_per_minute=0, max_calls_per_client=0))
    runner = web.AppRunner(service.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    await soak(url, warmup, concurrency)
    await settle(service)
    before = census(service)
    ended_before = ended_by_reason(service)
    started = time.monotonic()
    outcomes: dict[str, int] = {}
    rss_curve = []
    for done in range(0, calls, 100):  # in chunks, to see whether memory keeps growing or levels off
        for outcome, count in (await soak(url, min(100, calls - done), concurrency)).items():
            outcomes[outcome] = outcomes.get(outcome, 0) + count
        await settle(service)
        rss_curve.append(round(rss_mib(), 1))
    after = census(service)
    elapsed = time.monotonic() - started
    ended = {reason: count - ended_before.get(reason, 0) for reason, count in ended_by_reason(service).items()}
    await runner.cleanup()
    await engine.stop()
    return {
        "model": model,
        "calls": calls,
        "concurrency": concurrency,
        "seconds": round(elapsed, 1),
        "outcomes": outcomes,
        "ended_by_reason": ended,
        "before": before,
        "after": after,
        "rss_growth_mib": round(after["rss_mib"] - before["rss_mib"], 1),
        "rss_mib_every_100_calls": rss_curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="echo")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.model, args.calls, args.concurrency, args.warmup)), indent=2))


if __name__ == "__main__":
    main()
