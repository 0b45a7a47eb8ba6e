"""Call set-up time on loopback: POST -> answer and answer -> connected, for /offer and WHIP, whatever TURN does.

    ./run bench connect                 # 20 calls per case and endpoint
    ./run bench connect --calls 40 --json connect.json

Each case runs two real servers side by side (`moshi-webrtc serve --model echo`,
in their own processes, media in a worker as by default): the current one, and
one with `--server-stun-turn`, which restores the old behaviour (the server's
own peer gathers STUN/TURN candidates before it answers). Calls alternate
between them, one at a time. Cases: no TURN; a working coturn on 127.0.0.1;
a TURN URL on a closed port (unreachable); relay-only with the working coturn.

The caller is a real aiortc peer with host candidates on 127.0.0.1 and no
STUN/TURN of its own (its gathering happens before the POST and is not timed;
an aiortc caller given the unreachable TURN would wait 5 s itself, a browser
trickles). It offers an audio transceiver and the `events` data channel, as
the page does. Timed per call:

    answer      POST sent -> answer received (the server's ICE gathering included)
    connected   answer received -> the caller's connectionState is "connected" (ICE + DTLS)

Goal on loopback: answer <= 100 ms and connected <= 250 ms in every case.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from aiortc import RTCPeerConnection, RTCSessionDescription  # noqa: E402

from server.media.ice import IceConfig, use_host_addresses  # noqa: E402

SECRET = "bench-connect-secret"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Coturn:
    """Debian's coturn on 127.0.0.1 with TURN REST credentials (as tests/conftest.py starts it)."""

    def __init__(self, folder: str):
        binary = shutil.which("turnserver")
        if binary is None:
            raise SystemExit("coturn is not installed: apt-get install coturn")
        self.port = free_port(socket.SOCK_DGRAM)
        self.url = f"turn:127.0.0.1:{self.port}?transport=udp"
        self.process = subprocess.Popen(
            [binary, "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", f"--listening-port={self.port}",
             "--min-port=49500", "--max-port=49900", "--use-auth-secret", f"--static-auth-secret={SECRET}",
             "--realm=moshi.bench", "--no-tls", "--no-dtls", "--allow-loopback-peers", "--no-cli", "--fingerprint",
             "--log-file=stdout", "--simple-log", "--verbose", f"--pidfile={folder}/turn.pid", f"--db={folder}/turndb"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in self.process.stdout:
            if "UDP listener opened on" in line:
                break
        threading.Thread(target=lambda: [None for _ in self.process.stdout], daemon=True).start()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class Server:
    """`moshi-webrtc serve --model echo` in its own process; ready once it says so on stderr."""

    def __init__(self, extra: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, NO_TORCH_COMPILE="1", PYTHONPATH=str(ROOT), MOSHI_WEBRTC_TURN_SECRET=SECRET)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--model", "echo", "--port", str(self.port),
             "--max-calls", "4", "--ice-host-address", "127.0.0.1", "--max-offers-per-minute", "0",
             "--max-calls-per-client", "0",
             "--log-level", "WARNING", *extra],
            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.log: list[str] = []
        for line in self.process.stderr:
            self.log.append(line)
            if "ready for" in line:
                break
        else:
            raise SystemExit("the server did not start:\n" + "".join(self.log))
        threading.Thread(target=lambda: [self.log.append(line) for line in self.process.stderr], daemon=True).start()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@dataclass
class Timings:
    answer_ms: list[float] = field(default_factory=list)
    connected_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        def cut(values: list[float]) -> dict:
            if not values:
                return {"p50": None, "p95": None}
            p95 = statistics.quantiles(values, n=20, method="inclusive")[18] if len(values) > 1 else values[0]
            return {"p50": round(statistics.median(values), 1), "p95": round(p95, 1)}

        return {"calls": len(self.answer_ms), "failures": len(self.failures),
                "answer_ms": cut(self.answer_ms), "connected_ms": cut(self.connected_ms)}


async def one_call(http: aiohttp.ClientSession, url: str, endpoint: str, timings: Timings) -> None:
    pc = RTCPeerConnection(IceConfig().rtc_configuration())
    connected = asyncio.Event()

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState == "connected":
            connected.set()

    pc.addTransceiver("audio", direction="sendrecv")
    pc.createDataChannel("events")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    hang_up = None
    try:
        posted = time.monotonic()
        if endpoint == "offer":
            async with http.post(f"{url}/offer", json={"sdp": sdp, "type": "offer"}) as response:
                body = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"{response.status}: {body}")
            answer, hang_up = body["sdp"], f"{url}/sessions/{body['session_id']}"
        else:
            async with http.post(f"{url}/whip", data=sdp, headers={"Content-Type": "application/sdp"}) as response:
                answer = await response.text()
                if response.status != 201:
                    raise RuntimeError(f"{response.status}: {answer}")
            hang_up = url + response.headers["Location"]
        answered = time.monotonic()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await asyncio.wait_for(connected.wait(), 30)
        done = time.monotonic()
        timings.answer_ms.append(1000 * (answered - posted))
        timings.connected_ms.append(1000 * (done - answered))
    except Exception as exc:  # noqa: BLE001 - a failed call is counted and shown, the run goes on
        timings.failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        if hang_up is not None:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.delete(hang_up):
                    pass
        await pc.close()


async def run_case(name: str, turn: list[str], calls: int, results: dict) -> None:
    servers = {"now": Server(turn), "before": Server([*turn, "--server-stun-turn"])}
    try:
        async with aiohttp.ClientSession() as http:
            for endpoint in ("offer", "whip"):
                timings = {label: Timings() for label in servers}
                for _ in range(calls):
                    for label, server in servers.items():  # side by side: one call each, in turn
                        await one_call(http, server.url, endpoint, timings[label])
                for label, timing in timings.items():
                    summary = timing.summary()
                    results.setdefault(name, {}).setdefault(endpoint, {})[label] = summary
                    print(f"{name:22s} {endpoint:5s} {label:6s} {json.dumps(summary)}", flush=True)
                    for failure in timing.failures[:3]:
                        print(f"    failed: {failure}", flush=True)
    finally:
        for server in servers.values():
            server.stop()


def table(results: dict) -> str:
    lines = ["| case | endpoint | answer p50 / p95 (ms), now | connected p50 / p95 (ms), now | "
             "answer p50 / p95, before | connected p50 / p95, before |", "|---|---|---|---|---|---|"]
    for case, endpoints in results.items():
        for endpoint, runs in endpoints.items():
            cells = []
            for label in ("now", "before"):
                run = runs[label]
                fail = f" ({run['failures']} failed)" if run["failures"] else ""
                cells += [f"{run['answer_ms']['p50']} / {run['answer_ms']['p95']}{fail}",
                          f"{run['connected_ms']['p50']} / {run['connected_ms']['p95']}"]
            lines.append(f"| {case} | {endpoint} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20, help="calls per case, endpoint and server")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--cases", default="no-turn,coturn,unreachable,relay-only", help="comma-separated")
    args = parser.parse_args()
    use_host_addresses(["127.0.0.1"])
    results: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        coturn = Coturn(folder)
        try:
            cases = {
                "no-turn": [],
                "coturn": ["--turn-url", coturn.url],
                "unreachable": ["--turn-url", f"turn:127.0.0.1:{free_port(socket.SOCK_DGRAM)}?transport=udp"],
                "relay-only": ["--turn-url", coturn.url, "--ice-transport-policy", "relay"],
            }
            for name in args.cases.split(","):
                await run_case(name, cases[name], args.calls, results)
        finally:
            coturn.stop()
    print()
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
