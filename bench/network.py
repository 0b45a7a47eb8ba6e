"""Calls over an impaired network: our server against a naive aiortc echo, side by side.

    ./run bench network                                  # every condition, 30 s calls
    ./run bench network --conditions clean,one_loss --seconds 20
    ./run bench network --caller chromium                # Debian's Chromium calls instead of aiortc

A userspace UDP relay on 127.0.0.1 (tests/net_relay.py; tc/netem is not available here) sits
between a real caller (aiortc, or Chromium: bench/chromium_caller.py) and the server and impairs
the media per direction: `up` is caller -> server, `down` server -> caller. The caller sends
self-identifying tone bursts (one every 500 ms) and records what comes back with its arrival
times; both servers echo: ours through the `echo` engine (Moshi's frame structure: 80 ms frames
and one frame of delay, our receive path, our Opus sender), the naive one by handing aiortc's
received track straight back to aiortc's sender (aiortc's fixed jitter buffer, no concealment).
Per call: mouth-to-ear p50 over the first and the last third of the bursts, bursts heard of sent,
and for ours the receive path's counters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402
from aiortc import RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.contrib.media import MediaRelay  # noqa: E402
from net_relay import Rule, UdpRelay, clean, lose  # noqa: E402

from server.caller import record_track  # noqa: E402
from server.engine.setup import create_engine  # noqa: E402
from server.media.audio_out import OutboundAudioTrack  # noqa: E402
from server.media.ice import IceConfig, use_host_addresses  # noqa: E402
from server.media.latency_probe import BurstPlan  # noqa: E402
from server.model.source import ModelSource  # noqa: E402
from signaling.app import SignalingConfig, SignalingService  # noqa: E402

PACKETS_PER_S = 50


def random_loss(fraction: float, seed: int) -> Rule:
    rng = random.Random(seed)
    return lambda index: None if rng.random() < fraction else 0.0


def jitter(base_s: float, spread_s: float, seed: int) -> Rule:
    rng = random.Random(seed)

    def late(index: int) -> float:
        return base_s + rng.uniform(0, spread_s)  # reordering happens when spread > 20 ms

    late.path_delay_s = base_s + spread_s / 2  # RTCP, STUN and DTLS take the path's mean delay (net_relay)
    return late


def lossy_jitter(fraction: float, base_s: float, spread_s: float, seed: int) -> Rule:
    lossy, late = random_loss(fraction, seed), jitter(base_s, spread_s, seed + 100)

    def lossy_late(index: int) -> float | None:
        return None if lossy(index) is None else late(index)

    lossy_late.path_delay_s = late.path_delay_s
    return lossy_late


def conditions(seconds: float) -> dict[str, tuple[Rule, Rule]]:
    """Fresh rules (their random streams restart) for each call."""
    return {
        "clean": (clean, clean),
        "one_loss": (lose(int(seconds * 0.3 * PACKETS_PER_S)), clean),  # one caller packet, 30% into the call
        "loss2_both": (random_loss(0.02, 1), random_loss(0.02, 2)),
        "loss5_up": (random_loss(0.05, 3), clean),
        "loss5_down": (clean, random_loss(0.05, 4)),
        "jitter30_delay20": (jitter(0.02, 0.03, 5), jitter(0.02, 0.03, 6)),
        "loss5_jitter30": (lossy_jitter(0.05, 0.02, 0.03, 7), lossy_jitter(0.05, 0.02, 0.03, 8)),
    }


# -- the two servers -------------------------------------------------------------------------------


async def start_ours() -> tuple[str, SignalingService, web.AppRunner]:
    engine = create_engine(ModelSource("echo"), max_calls=2, echo_delay_frames=1)
    await engine.start()
    service = SignalingService(engine, SignalingConfig(max_offers_per_minute=0, max_calls_per_client=0))
    runner = web.AppRunner(service.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", service, runner


async def start_naive() -> tuple[str, web.AppRunner]:
    """aiortc's own echo: the received track goes straight back out."""
    peers: set[RTCPeerConnection] = set()
    relay = MediaRelay()

    async def offer(request: web.Request) -> web.Response:
        body = await request.json()
        pc = RTCPeerConnection(IceConfig().rtc_configuration())
        peers.add(pc)
        pc.on("track", lambda track: pc.addTrack(relay.subscribe(track)) if track.kind == "audio" else None)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
        await pc.setLocalDescription(await pc.createAnswer())
        return web.json_response({"sdp": pc.localDescription.sdp, "type": "answer", "session_id": str(id(pc))})

    async def close_all(app: web.Application) -> None:
        await asyncio.gather(*(pc.close() for pc in peers))

    app = web.Application()
    app.router.add_post("/offer", offer)
    app.on_cleanup.append(close_all)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", runner


# -- one call ----------------------------------------------------------------------------------------


async def call(url: str, up: Rule, down: Rule, seconds: float, on_answer=lambda session_id: None) -> dict:
    plan = burst_plan(seconds)
    relay = await UdpRelay(up=up, down=down).start()
    pc = RTCPeerConnection(IceConfig().rtc_configuration())
    voice = OutboundAudioTrack(sample_rate=48000, max_buffer_ms=int(1000 * (seconds + 5)))
    voice.push(plan.audio())
    pc.addTrack(voice)
    chunks, arrivals, readers = [], [], []
    pc.on("track", lambda track: readers.append(asyncio.ensure_future(record_track(track, chunks, arrivals))))
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        offer = {"sdp": relay.offer(pc.localDescription.sdp), "type": "offer"}
        async with http.post(f"{url}/offer", json=offer) as response:
            answer = await response.json()
        on_answer(answer["session_id"])
        await pc.setRemoteDescription(RTCSessionDescription(sdp=relay.answer(answer["sdp"]), type="answer"))
        await asyncio.sleep(seconds)
    for reader in readers:
        reader.cancel()
    await pc.close()
    relay.close()
    delays = plan.delays(chunks, arrivals, voice.clock_start or time.monotonic())
    return summarize(delays, plan, relay)


def burst_plan(seconds: float) -> BurstPlan:
    return BurstPlan(count=int((seconds - 1.0) / 0.5), every_s=0.5, lead_s=0.5)


def summarize(delays: dict[int, float], plan: BurstPlan, relay: UdpRelay) -> dict:
    third = plan.count // 3

    def p50(bursts: range) -> float | None:
        values = [delays[b] for b in bursts if b in delays]
        return round(1000 * statistics.median(values)) if values else None

    return {
        "bursts_heard": f"{len(delays)}/{plan.count}",
        "p50_first_third_ms": p50(range(third)),
        "p50_last_third_ms": p50(range(plan.count - third, plan.count)),
        "p50_ms": p50(range(plan.count)),
        "up_dropped": relay.up.dropped,
        "down_dropped": relay.down.dropped,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--conditions", default=None, help="comma-separated; default: all")
    parser.add_argument("--caller", choices=["aiortc", "chromium"], default="aiortc")
    args = parser.parse_args()
    use_host_addresses(["127.0.0.1"])
    names = args.conditions.split(",") if args.conditions else list(conditions(args.seconds))
    ours_url, service, ours_runner = await start_ours()
    naive_url, naive_runner = await start_naive()
    async with contextlib.AsyncExitStack() as stack:
        place = call
        if args.caller == "chromium":
            place = await stack.enter_async_context(chromium_placer())
        try:
            await run_conditions(names, args.seconds, place, ours_url, service, naive_url)
        finally:
            await ours_runner.cleanup()
            await service.engine.stop()
            await naive_runner.cleanup()


@contextlib.asynccontextmanager
async def chromium_placer():
    """`call`'s twin with Debian's Chromium as the caller (one browser, a fresh page per call)."""
    from chromium_caller import CHROMIUM, CHROMIUM_FLAGS, chromium_call
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)

        async def place(url: str, up: Rule, down: Rule, seconds: float, on_answer=lambda session_id: None) -> dict:
            plan = burst_plan(seconds)
            heard, relay = await chromium_call(browser, url, up, down, seconds, plan, on_answer)
            return {**summarize(heard["delays"], plan, relay), "chromium": heard["stats"]}

        try:
            yield place
        finally:
            await browser.close()


async def run_conditions(names: list[str], seconds: float, place, ours_url: str, service: SignalingService,
                         naive_url: str) -> None:
    for name in names:
        up, down = conditions(seconds)[name]
        naive = await place(naive_url, up, down, seconds)
        up, down = conditions(seconds)[name]
        answered: list = []
        ours = await place(ours_url, up, down, seconds,
                           on_answer=lambda session_id, got=answered: got.append(service.sessions[session_id]))
        receive = answered[0].receiver.stats.as_dict() if answered else None
        if answered:  # the server's own estimate of the delay the caller hears, to set against the measure
            ours["server_estimate_ms"] = answered[0].summary()["mouth_to_ear_estimate_ms"]
        print(json.dumps({"condition": name, "seconds": seconds, "naive_aiortc_echo": naive, "ours": ours,
                          "ours_receive": receive}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
