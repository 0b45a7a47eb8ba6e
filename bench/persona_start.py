"""Time from a persona call's answer to the model's first audio, with a neighbour on the line.

    ./run bench persona_start                 # 6 rounds, tiny-persona on the CPU
    ./run bench persona_start --model DIR     # any PersonaPlex-style model serve takes

Each round places two calls, one after the other, through real aiortc on
loopback to an in-process server: one with the server's default persona
(its default voice and text prompt), one with an empty persona (no voice, no
text: only the two 0.5 s silences PersonaPlex frames prompts with). The
difference is what replaying a persona costs a caller. Meanwhile a neighbour
call talks the whole time; its dropped frames and the engine's step times
show whether the replays stalled it.

Reported per kind: median answer -> first audible reply frame at the caller,
the server's prompt replay time and its model steps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
from aiohttp import web  # noqa: E402

from server.caller import place_call  # noqa: E402
from server.engine.setup import create_engine  # noqa: E402
from server.media.ice import use_host_addresses  # noqa: E402
from server.model.source import ModelSource  # noqa: E402
from signaling.app import SignalingConfig, SignalingService  # noqa: E402


def speech_like(seconds: float, rate: int = 48000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.1 * (0.55 + 0.45 * np.sin(2 * np.pi * 3 * t)) * np.sin(2 * np.pi * 180 * t)).astype(np.float32)


async def one_call(url: str, persona: dict) -> dict:
    recording = await place_call(url, speech_like(3.0), tail_s=1.0, persona=persona)
    ready = next(e for e in recording.events if e["type"] == "ready")
    done = next((e for e in recording.events if e["type"] == "prompt"), {})
    return {
        "answer_to_first_audio_ms": recording.summary()["answer_to_first_audio_ms"],
        "prompt_s": done.get("seconds"),
        "steps": int(ready["persona"].rsplit("steps=", 1)[1]),
    }


async def run(model: str, rounds: int, cpu_threads: int) -> dict:
    use_host_addresses(["127.0.0.1"])
    engine = create_engine(ModelSource(model), max_calls=2, cpu_threads=cpu_threads)
    await engine.start()
    service = SignalingService(engine, SignalingConfig(max_calls_per_client=0))
    runner = web.AppRunner(service.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    neighbour = asyncio.ensure_future(place_call(url, speech_like(10.0 * rounds), tail_s=0, persona={}))
    while len(service.sessions) < 1 or engine.stats.prompt_steps == 0:
        await asyncio.sleep(0.05)
    neighbour_session = next(iter(service.sessions.values()))
    await neighbour_session.call.prompt_done
    results: dict[str, list[dict]] = {"default persona": [], "empty persona": []}
    for _ in range(rounds):
        results["default persona"].append(await one_call(url, {}))
        results["empty persona"].append(await one_call(url, {"prompt": "", "voice": ""}))
    neighbour_summary = neighbour_session.summary()
    async with aiohttp.ClientSession() as http:
        await http.delete(f"{url}/sessions/{neighbour_session.session_id}")
    await neighbour
    stats = engine.stats.summary()
    await runner.cleanup()
    await engine.stop()

    report: dict = {"model": model, "rounds": rounds, "cpu_threads": cpu_threads}
    for kind, calls in results.items():
        report[kind] = {
            "answer_to_first_audio_ms_median": statistics.median(c["answer_to_first_audio_ms"] for c in calls),
            "prompt_s_median": statistics.median(c["prompt_s"] for c in calls),
            "steps": calls[0]["steps"],
        }
    default, empty = report["default persona"], report["empty persona"]
    report["default_over_empty"] = round(
        default["answer_to_first_audio_ms_median"] / empty["answer_to_first_audio_ms_median"], 2)
    report["replay_steps_per_s"] = round(default["steps"] / default["prompt_s_median"], 1)
    report["neighbour"] = {"frames_dropped": neighbour_summary["frames_dropped"],
                           "frames_in": neighbour_summary["frames_in"]}
    report["engine_step_ms_p50"], report["engine_step_ms_p99"] = stats["step_ms_p50"], stats["step_ms_p99"]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-persona")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--cpu-threads", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.model, args.rounds, args.cpu_threads)), indent=2))


if __name__ == "__main__":
    main()
