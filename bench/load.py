"""Load test: K concurrent WebRTC callers from a second process against a server, on loopback.

    ./run bench load --model echo --calls 1,2,4,8 --seconds 60
    ./run bench load --model tiny --calls 1,2,4 --seconds 60
    python3 bench/load.py --model random-moshiko --calls 1,8,16,32 --seconds 20   # a GPU host

Callers are spread over client processes (`--callers-per-process`, default 6),
so the callers' own media work never limits the server under test.

For each K the server (`moshi-webrtc serve`, its own process) is started fresh
with --max-calls K; a client process places K calls at once, each streaming
self-identifying tone bursts (server/media/latency_probe.py) for the whole run. Per K:

- mouth-to-ear delay per call, p50 and p95 (meaningful with `echo`, which sends
  the bursts back; the tiny model answers with babble, so there only the
  counters below speak),
- frames dropped by the engine (the model fell behind) and output audio shed,
- engine step time p50 and p99, from the server's /status,
- the server's own mouth-to-ear estimate per call (the only delay figure a
  model that does not echo can give; random-weight models babble),
- the callers' audio the server concealed (median per call), packets that came after
  their slot, and how often the server's own event loop stalled (its receive clock held
  back for the packets waiting in the socket),
- server CPU (share of one core, user + system, and per call; the server and any media worker
  processes under it), over the whole window and in steady state (from 5 s in to 1 s before the
  end: media only, no call setup), and peak memory (VmHWM, summed over those processes).

"Real time" means: no input frame dropped, and the engine's p99 step under 80 ms;
with echo also a p95 delay within 100 ms of the one-call figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402

BIN = Path(sys.executable).parent / "moshi-webrtc"
# Where the package is not installed (a GPU host with wheels on PYTHONPATH), run the CLI module.
SERVE = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "server.cli"]
# The server on uvloop's event loop (`--loop uvloop`), without a change to the CLI: the policy is set first.
SERVE_UVLOOP = [sys.executable, "-c", "import asyncio, sys, uvloop; "
                "asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
                "from server.cli import main; sys.exit(main())"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # fields from 3 (state) on


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of `pid` and every process under it, live or already reaped: the server
    may carry its calls' media in worker processes."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = _stat(current)
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime, stime, and the reaped children's cutime, cstime
        todo += children.get(current, [])
    return total / CLK_TCK


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def tree_peak_rss_mib(pid: int) -> float:
    """The server's peak resident memory plus that of each process under it (media workers)."""
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += peak_rss_mib(current)
            todo += [int(c) for c in Path(f"/proc/{current}/task/{current}/children").read_text().split()]
        except OSError:
            continue
    return total


STEADY_FROM_S = 5.0  # calls are set up (ICE, DTLS) and media flows by then


async def steady_cpu(pid: int, seconds: float) -> float | None:
    """Server CPU (cores) while the calls only carry media: from STEADY_FROM_S into the window to a second
    before its end, so setting calls up and tearing them down are left out. None for windows too short."""
    if seconds < STEADY_FROM_S + 5:
        return None
    await asyncio.sleep(STEADY_FROM_S)
    cpu_from, wall_from = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds - STEADY_FROM_S - 1)
    return (cpu_seconds(pid) - cpu_from) / (time.monotonic() - wall_from)


# -- the client process ---------------------------------------------------------------------------


async def one_caller(url: str, seconds: float, index: int) -> dict:
    from aiortc import RTCPeerConnection, RTCSessionDescription

    from server.caller import record_track
    from server.media.audio_out import OutboundAudioTrack
    from server.media.ice import IceConfig
    from server.media.latency_probe import BurstPlan

    plan = BurstPlan(count=int(seconds / 0.5) - 1, every_s=0.5, lead_s=0.5 + 0.013 * index)
    pc = RTCPeerConnection(IceConfig().rtc_configuration())
    voice = OutboundAudioTrack(sample_rate=48000, max_buffer_ms=int(1000 * (seconds + 5)))
    voice.push(plan.audio())
    pc.addTrack(voice)
    chunks: list[np.ndarray] = []
    arrivals: list[float] = []
    readers = []

    pc.on("track", lambda track: readers.append(asyncio.ensure_future(record_track(track, chunks, arrivals))))

    await pc.setLocalDescription(await pc.createOffer())
    offer = {"sdp": pc.localDescription.sdp, "type": "offer"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/offer", json=offer) as response:
            answer = await response.json()
            if response.status != 200:
                return {"error": answer.get("error"), "status": response.status}
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        await asyncio.sleep(seconds)  # the measurement window
        async with http.get(f"{url}/sessions/{answer['session_id']}") as response:
            session = await response.json()
        async with http.delete(f"{url}/sessions/{answer['session_id']}") as response:
            await response.read()
    for reader in readers:
        reader.cancel()
    await pc.close()
    delays = list(plan.delays(chunks, arrivals, voice.clock_start or 0.0).values()) if voice.clock_start else []
    return {
        "bursts_sent": plan.count,
        "bursts_heard": len(delays),
        "delay_ms_p50": round(1000 * statistics.median(delays), 1) if delays else None,
        "delay_ms_p95": round(1000 * float(np.percentile(delays, 95)), 1) if delays else None,
        "frames_dropped": session.get("frames_dropped"),
        "output_ms_shed": round(1000 * session.get("outbound_samples_dropped", 0) / 24000),
        "frames_in": session.get("frames_in"),
        "frames_silent": session.get("frames_silent"),
        "mouth_to_ear_estimate_ms": session.get("mouth_to_ear_estimate_ms"),
        "receive": {key: session.get("receive", {}).get(key)
                    for key in ("lost", "late", "concealed_ms", "pauses", "loop_stalls", "loop_stalled_ms")},
    }


async def client_main(url: str, calls: int, seconds: float, first_index: int) -> None:
    from server.media.ice import use_host_addresses

    use_host_addresses(["127.0.0.1"])
    results = await asyncio.gather(*(one_caller(url, seconds, first_index + i) for i in range(calls)))
    print(json.dumps(results))


async def run_clients(url: str, calls: int, seconds: float, per_process: int, env: dict) -> list[dict]:
    """`calls` callers in groups of `per_process`, each group its own process; every result, in order."""
    groups = [(start, min(per_process, calls - start)) for start in range(0, calls, per_process)]
    clients = [
        await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--client", url, "--calls", str(count), "--seconds", str(seconds),
            "--first-index", str(start), stdout=asyncio.subprocess.PIPE, env=env,
        )
        for start, count in groups
    ]
    outputs = await asyncio.gather(*(client.communicate() for client in clients))
    results: list[dict] = []
    for client, (out, _) in zip(clients, outputs, strict=True):
        lines = out.decode().strip().splitlines()
        if client.returncode != 0 or not lines:
            raise RuntimeError(f"a client process failed (exit {client.returncode})")
        results += json.loads(lines[-1])
    return results


# -- the orchestrator ------------------------------------------------------------------------------


async def run_k(model: str, calls: int, seconds: float, per_process: int, server_args: list[str],
                loop: str = "asyncio") -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, NO_TORCH_COMPILE="1")
    serve = SERVE_UVLOOP if loop == "uvloop" else SERVE
    server = subprocess.Popen(
        [*serve, "serve", "--model", model, "--port", str(port), "--max-calls", str(calls),
         "--ice-host-address", "127.0.0.1", "--log-level", "WARNING", "--max-offers-per-minute", "0",
         "--max-calls-per-client", "0", *server_args],  # every caller is on this host
        stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )
    said = []
    for line in server.stderr:
        said.append(line)
        if "ready for" in line:
            break
    else:
        raise RuntimeError(f"the server exited before it was ready: {''.join(said[-20:])}")
    drain = asyncio.get_running_loop().run_in_executor(None, server.stderr.read)
    cpu_before, wall_before = cpu_seconds(server.pid), time.monotonic()
    steady = asyncio.ensure_future(steady_cpu(server.pid, seconds))
    per_call = await run_clients(url, calls, seconds, per_process, env)
    cpu = (cpu_seconds(server.pid) - cpu_before) / (time.monotonic() - wall_before)
    steady_cpu_cores = await steady
    async with aiohttp.ClientSession() as http, http.get(f"{url}/status") as response:
        status = await response.json()
    rss = tree_peak_rss_mib(server.pid)
    server.terminate()
    server.wait(timeout=30)
    await drain
    engine = status["engine"]
    estimates = [c["mouth_to_ear_estimate_ms"] for c in per_call if c.get("mouth_to_ear_estimate_ms") is not None]
    p95s = [c["delay_ms_p95"] for c in per_call if c.get("delay_ms_p95") is not None]
    return {
        "model": model,
        "server_args": " ".join(server_args),
        "loop": loop,
        "calls": calls,
        "seconds": seconds,
        "delay_ms_p50_median": round(statistics.median([c["delay_ms_p50"] for c in per_call
                                                        if c.get("delay_ms_p50") is not None]), 1) if p95s else None,
        "delay_ms_p95_worst": max(p95s) if p95s else None,
        "frames_dropped": engine["frames_dropped"],
        "output_ms_shed": sum(c.get("output_ms_shed", 0) for c in per_call),
        "step_ms_p50": engine["step_ms_p50"],
        "step_ms_p99": engine["step_ms_p99"],
        "mouth_to_ear_estimate_ms_median": statistics.median(estimates) if estimates else None,
        "mouth_to_ear_estimate_ms_worst": max(estimates) if estimates else None,
        "server_cpu_cores": round(cpu, 2),
        "server_cpu_cores_per_call": round(cpu / calls, 3),
        "server_cpu_cores_per_call_steady": round(steady_cpu_cores / calls, 3) if steady_cpu_cores else None,
        "server_peak_rss_mib": round(rss),
        # the callers' audio the server concealed (on loopback nothing is lost: what is, is the server's own
        # loop falling behind), and the stalls of its loop that its receive clock held back for
        "concealed_ms_per_call_median": statistics.median(receive_figure(per_call, "concealed_ms")),
        "late_packets": sum(receive_figure(per_call, "late")),
        "loop_stalls": sum(receive_figure(per_call, "loop_stalls")),
        "per_call": per_call,
    }


def receive_figure(per_call: list[dict], key: str) -> list[float]:
    """One receive-path counter per call (0 where the server does not report it)."""
    return [(c.get("receive") or {}).get(key) or 0 for c in per_call]


async def orchestrate(model: str, calls: list[int], seconds: float, per_process: int, server_args: list[str],
                      loop: str = "asyncio") -> None:
    baseline = None
    for k in calls:
        result = await run_k(model, k, seconds, per_process, server_args, loop)
        if baseline is None:
            baseline = result["delay_ms_p95_worst"]
        real_time = result["frames_dropped"] == 0 and result["step_ms_p99"] < 80
        if model == "echo" and baseline is not None and result["delay_ms_p95_worst"] is not None:
            real_time = real_time and result["delay_ms_p95_worst"] <= baseline + 100
        result["real_time"] = real_time
        print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="echo", help="echo or tiny (or any --model serve takes)")
    parser.add_argument("--calls", default="1,2,4,8", help="comma-separated K values")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--callers-per-process", type=int, default=6,
                        help="callers per client process (one event loop carries about a dozen)")
    parser.add_argument("--server-args", default="", help="more `serve` options, e.g. '--switch-interval-ms 5'")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="the server's event loop (uvloop: pip install uvloop; media worker processes, "
                             "if any, keep asyncio's)")
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--first-index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(client_main(args.client, int(args.calls), args.seconds, args.first_index))
    else:
        asyncio.run(orchestrate(args.model, [int(k) for k in args.calls.split(",")], args.seconds,
                                args.callers_per_process, args.server_args.split(), args.loop))


if __name__ == "__main__":
    main()
