"""Abuse, before and after: what each attack does to a server checkout, and what a legitimate caller gets meanwhile.

    .venv/bin/python bench/abuse.py --checkout /tmp/base-f38c2f6 --checkout /work/main [--rows a,b] [--quick]
        [--out /tmp/abuse.jsonl]

For every row, each checkout in turn (alternating, on the same machine) is started fresh as its own process,

    python -m server.cli serve --model echo --port P --max-calls 4 --ice-host-address 127.0.0.1 \
        --media-workers 0 --log-level WARNING

with cwd and PYTHONPATH set to the checkout and NO_TORCH_COMPILE=1, always with this repository's .venv Python
(the same packages for both); only flags a checkout's `serve --help` names are passed. The attack clients and
the legitimate caller run in this process, on this repository's code (server.caller.place_call and plain
aiortc/aiohttp). Attackers' HTTP comes from 127.0.0.2 (and 127.0.0.3); the legitimate caller from 127.0.0.1.

Rows (see each row's function for what it reports):

    never_connect, never_connect_2   valid offers that never connect, from one or two addresses
    four_sparse_calls                4 connected calls from one address, one RTP packet every 9 s each
    ten_x_rtp                        a connected caller sending 10x real time, beside a 10 s call
    many_mlines                      5 offers with 400 extra audio sections, during a 12.5 s call
    many_candidates                  an offer with 800 host candidates at ports where we count STUN checks
    patch_flood                      100 WHIP PATCHes of 1000 candidates each on a live WHIP call
    endless_dc_message               an SCTP message on the events channel that never ends, beside a call
    options_preflight                300 same-origin CORS preflights of /whip without the token
    bad_requests                     nested JSON, malformed WHIP trickle, an offer without a fingerprint
    half_open_http                   1000 TCP connections that each send half a request head

Prints one JSON line per measurement as it comes (also appended to --out), then a markdown table.
A row that fails records its error instead of ending the run; every server is stopped in the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the attack clients the tests use (tests/attackers.py)

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.rtcsctptransport import (  # noqa: E402
    SCTP_DATA_FIRST_FRAG,
    USERDATA_MAX_LENGTH,
)
from attackers import ChunkCrafter, SparseTrack, UnpacedTone, aiortc_offer  # noqa: E402

from server.caller import CallFailed, CallRefused, place_call, record_track  # noqa: E402
from server.media.audio_out import OutboundAudioTrack  # noqa: E402
from server.media.ice import IceConfig, use_host_addresses  # noqa: E402

PYTHON = ROOT / ".venv" / "bin" / "python"
LEGIT = "127.0.0.1"
STRANGER = "127.0.0.2"
SECOND_STRANGER = "127.0.0.3"
SDP = "application/sdp"
SDPFRAG = "application/trickle-ice-sdpfrag"
HTTP_TIMEOUT_S = 30.0
ROW_LIMIT_S = 150.0  # a safety net around a whole row; each row keeps to its own, shorter plan
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- the server under test ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe_checkout(checkout: Path) -> str:
    """`name (commit)`, with `+` after the commit when tracked files differ from it."""
    try:
        commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return checkout.name
    return f"{checkout.name} ({commit}{'+' if dirty else ''})"


def server_env(checkout: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(checkout), "NO_TORCH_COMPILE": "1"}


def serve_help(checkout: Path) -> str:
    """The checkout's `serve --help` text: which flags it takes."""
    done = subprocess.run([str(PYTHON), "-m", "server.cli", "serve", "--help"], cwd=checkout,
                          env=server_env(checkout), capture_output=True, text=True, timeout=60)
    return done.stdout


class Server:
    """One `serve` process of a checkout; its stderr is drained on a thread so the pipe never fills."""

    def __init__(self, checkout: Path, extra: list[str]):
        self.checkout, self.extra = checkout, extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: collections.deque[str] = collections.deque(maxlen=400)
        self.problems: list[str] = []  # ERROR/CRITICAL/Traceback lines
        self.ready = threading.Event()
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout_s: float = 120.0) -> None:
        command = [str(PYTHON), "-m", "server.cli", "serve", "--model", "echo", "--port", str(self.port),
                   "--max-calls", "4", "--ice-host-address", "127.0.0.1", "--media-workers", "0",
                   "--log-level", "WARNING", *self.extra]
        self.process = subprocess.Popen(command, cwd=self.checkout, env=server_env(self.checkout),
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True, errors="replace")
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not self.ready.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = "".join(list(self.lines)[-8:])
                raise RuntimeError(f"serve {' '.join(self.extra)} did not get ready (exit {self.process.poll()}): "
                                   f"{tail[-1500:]}")

    def _drain(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if "ready for" in line:
                self.ready.set()
            if re.search(r"\b(ERROR|CRITICAL)\b|Traceback", line):
                self.problems.append(line.strip()[:300])

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(15)

    def cpu_s(self) -> float:
        """User + system CPU seconds the server process has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15

    def rss_mb(self) -> float:
        match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{self.pid}/status").read_text(), re.MULTILINE)
        return round(int(match.group(1)) / 1024, 1) if match else float("nan")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fd_limit(self) -> str:
        match = re.search(r"^Max open files\s+(\S+)", Path(f"/proc/{self.pid}/limits").read_text(), re.MULTILINE)
        return match.group(1) if match else "?"


# -- clients -----------------------------------------------------------------------------------------------------


def http_from(address: str, limit: int = 100) -> aiohttp.ClientSession:
    """HTTP from `address` (a loopback address): the server sees another client."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0), limit=limit),
                                 timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S))


def tone(seconds: float, hz: float = 440.0, rate: int = 48000) -> np.ndarray:
    """A -20 dBFS sine."""
    t = np.arange(int(seconds * rate)) / rate
    return (0.1 * np.sqrt(2) * np.sin(2 * np.pi * hz * t)).astype(np.float32)


async def post_offer(http: aiohttp.ClientSession, url: str, sdp: str) -> tuple[int, dict, str | None]:
    """POST /offer: (status, JSON body or {"text": ...}, Retry-After)."""
    async with http.post(f"{url}/offer", json={"sdp": sdp, "type": "offer"}) as response:
        text = await response.text()
        try:
            body = json.loads(text)
        except ValueError:
            body = {"text": text[:200]}
        return response.status, body if isinstance(body, dict) else {"json": body}, response.headers.get("Retry-After")


async def get_session(http: aiohttp.ClientSession, url: str, session_id: str) -> dict:
    """GET /sessions/{id}: the call's figures ({"status": 404} when the server has forgotten it)."""
    async with http.get(f"{url}/sessions/{session_id}") as response:
        if response.status != 200:
            return {"status": response.status}
        return await response.json()


async def connect_peer(pc: RTCPeerConnection, http: aiohttp.ClientSession, url: str,
                       timeout_s: float = 15.0) -> tuple[int, str | None]:
    """Offer from `pc` over `http`, apply the answer, wait until connected: (status, session id)."""
    await pc.setLocalDescription(await pc.createOffer())
    status, body, _ = await post_offer(http, url, pc.localDescription.sdp)
    if status != 200:
        return status, None
    connected = asyncio.Event()
    if pc.connectionState == "connected":
        connected.set()
    pc.on("connectionstatechange", lambda: connected.set() if pc.connectionState == "connected" else None)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
    await asyncio.wait_for(connected.wait(), timeout_s)
    return status, body["session_id"]


@dataclass
class LegitCall:
    """What one legitimate call (server.caller.place_call, from 127.0.0.1) got."""

    ok: bool
    outcome: str  # "ok", "refused 503", "ice", "timeout", "ended: <reason>", ...
    sent_s: float
    reply_s: float = 0.0
    session_id: str = ""
    summary: dict = field(default_factory=dict)  # the server's GET /sessions/{id} after it ended


async def legit_call(url: str, seconds: float, fetch_summary: bool = False) -> LegitCall:
    """One call of `seconds` of tone; `fetch_summary`: and the server's figures for it afterwards."""
    async with http_from(LEGIT) as http:
        try:
            recording = await asyncio.wait_for(place_call(url, tone(seconds), tail_s=0.3, ice=IceConfig(), http=http),
                                               seconds + 30)
        except CallRefused as refused:
            return LegitCall(False, f"refused {refused.status}", seconds)
        except CallFailed:
            return LegitCall(False, "ice", seconds)
        except TimeoutError:
            return LegitCall(False, "timeout", seconds)
        except (aiohttp.ClientError, OSError) as exc:
            return LegitCall(False, f"http {type(exc).__name__}", seconds)
        reply_s = len(recording.audio) / 24000
        ok = recording.end_reason in (None, "hung up") and reply_s > 0
        call = LegitCall(ok, "ok" if ok else f"ended: {recording.end_reason or 'no audio'}", seconds,
                         round(reply_s, 2), recording.session_id)
        if fetch_summary and recording.session_id:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                call.summary = await get_session(http, url, recording.session_id)
        return call


async def legit_tries(url: str, until: float, every_s: float = 3.0, seconds: float = 1.5) -> dict:
    """A short call every `every_s` until loop time `until`: how many got in, and why the others did not."""
    loop = asyncio.get_running_loop()
    outcomes: collections.Counter[str] = collections.Counter()
    while loop.time() < until:
        began = loop.time()
        outcomes[(await legit_call(url, seconds)).outcome] += 1
        await asyncio.sleep(max(0.0, began + every_s - loop.time()))
    tries = sum(outcomes.values())
    return {"legit_in": f"{outcomes.pop('ok', 0)}/{tries}", "legit_failed": dict(outcomes)}


def receive_figures(summary: dict) -> dict:
    receive = summary.get("receive") or {}
    return {key: receive.get(key) for key in ("concealed_ms", "late", "loop_stalls", "loop_stalled_ms")}


def many_audio_sections(sdp: str, count: int) -> str:
    """`count` minimal audio sections more (tests/test_abuse.py's, with a=rtcp-mux and a=sendrecv), and the offer's
    ICE and DTLS attributes repeated at session level so that they hold for every section: an offer aiortc
    applies (the tests' bare sections fail its "ICE username fragment or password is missing" at once)."""
    shared = dict.fromkeys(line for line in sdp.split("\r\n")
                           if re.match(r"a=(ice-ufrag|ice-pwd|fingerprint|setup):", line))
    sdp = sdp.replace("t=0 0\r\n", "t=0 0\r\n" + "".join(f"{line}\r\n" for line in shared), 1)
    return sdp + "".join(f"m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:x{i}\r\na=rtcp-mux\r\na=sendrecv\r\n"
                         "a=rtpmap:111 opus/48000/2\r\n" for i in range(count))


class WhipCall:
    """A legitimate WHIP call from 127.0.0.1 that trickles (its offer has candidates, no end-of-candidates)."""

    def __init__(self, url: str, seconds: float):
        self.url = url
        self.pc = RTCPeerConnection()
        self.voice = OutboundAudioTrack(sample_rate=48000, max_buffer_ms=int(1000 * seconds) + 5000)
        self.voice.push(tone(seconds))
        self.pc.addTrack(self.voice)
        self.pc.createDataChannel("events")
        self.chunks: list[np.ndarray] = []
        self.arrivals: list[float] = []
        self.location = ""
        self.mid = ""
        self.reader: asyncio.Task | None = None

    async def start(self) -> None:
        connected = asyncio.Event()
        self.pc.on("connectionstatechange",
                   lambda: connected.set() if self.pc.connectionState == "connected" else None)

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self.reader = asyncio.ensure_future(record_track(track, self.chunks, self.arrivals))

        await self.pc.setLocalDescription(await self.pc.createOffer())
        sdp = self.pc.localDescription.sdp.replace("a=end-of-candidates\r\n", "")
        self.mid = re.search(r"^a=mid:(\S+)", sdp, re.MULTILINE).group(1)
        async with http_from(LEGIT) as http, http.post(f"{self.url}/whip", data=sdp,
                                                      headers={"Content-Type": SDP}) as response:
            if response.status != 201:
                raise RuntimeError(f"the legitimate WHIP call got {response.status}: {(await response.text())[:200]}")
            self.location = response.headers["Location"]
            answer = await response.text()
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await asyncio.wait_for(connected.wait(), 15)

    @property
    def reply_s(self) -> float:
        return round(sum(len(c) for c in self.chunks) / 24000, 2)

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader
        await self.pc.close()


def candidate_lines(count: int, host: Callable[[int], str], port: Callable[[int], int], prefix: str = "") -> str:
    return "".join(f"a=candidate:{prefix}{i} 1 udp 2130706431 {host(i)} {port(i)} typ host\r\n" for i in range(count))


async def close_all(pcs: list[RTCPeerConnection]) -> None:
    for pc in pcs:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pc.close(), 10)


# -- rows --------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    seconds: float  # the attack window of rows 1, 2 and 10
    quick: bool


async def never_connect(server: Server, plan: Plan, attackers: tuple[str, ...] = (STRANGER,)) -> dict:
    """Valid offers that never connect, from `attackers`, at most 20 a minute each (Retry-After honoured); a
    short legitimate call every ~3 s; /status polled every 0.25 s for the share of time every slot was busy."""
    loop = asyncio.get_running_loop()
    until = loop.time() + plan.seconds
    sdp = await aiortc_offer()
    statuses: collections.Counter[int] = collections.Counter()

    async def attack(address: str) -> None:
        async with http_from(address) as http:
            while loop.time() < until:
                began = loop.time()
                try:
                    status, _, retry_after = await post_offer(http, server.url, sdp)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    status, retry_after = type(exc).__name__, None
                statuses[status] += 1
                wait = 3.0  # 20 a minute, the server's default rate limit
                if retry_after is not None and retry_after.isdigit():
                    wait = max(wait, min(20.0, float(retry_after)))
                await asyncio.sleep(max(0.0, began + wait - loop.time()))

    async def poll() -> tuple[int, int]:
        busy = polls = 0
        async with http_from(LEGIT) as http:
            while loop.time() < until:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    async with http.get(f"{server.url}/status") as response:
                        polls += 1
                        busy += (await response.json()).get("free_slots") == 0
                await asyncio.sleep(0.25)
        return busy, polls

    results = await asyncio.gather(poll(), legit_tries(server.url, until), *(attack(a) for a in attackers))
    (busy, polls), legit = results[0], results[1]
    return {"all_busy": f"{100 * busy / max(polls, 1):.0f}% of {polls} polls", **legit,
            "attacker_statuses": dict(sorted(statuses.items(), key=str))}


async def never_connect_2(server: Server, plan: Plan) -> dict:
    """never_connect from two addresses (127.0.0.2 and 127.0.0.3)."""
    return await never_connect(server, plan, (STRANGER, SECOND_STRANGER))


async def four_sparse_calls(server: Server, plan: Plan) -> dict:
    """4 connected calls from one address, each sending one RTP packet every 9 s: how many were refused at
    offer time, how many ended and when (connection left `connected`, or the server says ended); legitimate
    tries over the rest of the row, once the attacker's calls are placed."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    until = started + plan.seconds
    pcs: list[RTCPeerConnection] = []
    calls: list[tuple[RTCPeerConnection, str, float]] = []
    statuses: collections.Counter[str] = collections.Counter()
    try:
        async with http_from(STRANGER) as http:
            for _ in range(4):
                pc = RTCPeerConnection()
                pcs.append(pc)
                pc.addTrack(SparseTrack(every_s=9.0))
                try:
                    status, session_id = await connect_peer(pc, http, server.url)
                except TimeoutError:
                    status, session_id = "connect timeout", None
                statuses[str(status)] += 1
                if session_id is not None:
                    calls.append((pc, session_id, loop.time()))
            legit = asyncio.ensure_future(legit_tries(server.url, until))  # once the attacker holds its calls
            ended: dict[str, tuple[float, str]] = {}
            while loop.time() < until and len(ended) < len(calls):
                for pc, session_id, connected_at in calls:
                    if session_id in ended:
                        continue
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                        summary = await get_session(http, server.url, session_id)
                        if summary.get("ended") or summary.get("status") == 404:
                            ended[session_id] = (loop.time() - connected_at, str(summary.get("end_kind")))
                    if session_id not in ended and pc.connectionState not in ("new", "connecting", "connected"):
                        ended[session_id] = (loop.time() - connected_at, f"connection {pc.connectionState}")
                await asyncio.sleep(0.5)
        legit_figures = await asyncio.wait_for(legit, plan.seconds + 40)
    finally:
        await close_all(pcs)
    ends = sorted(ended.values())
    return {"offers": dict(statuses), "ended": f"{len(ended)}/{len(calls)} within {plan.seconds:.0f} s",
            "ended_after_s": [round(s, 1) for s, _ in ends], "end_kinds": sorted({k for _, k in ends}),
            **legit_figures}


async def ten_x_rtp(server: Server, plan: Plan) -> dict:
    """A connected caller sending about 10x real time beside a legitimate call of 10 s (--quick 6 s): the
    attacker's engine frames a second (real time: 12.5) and the legitimate call's reply and receive figures."""
    seconds = 6.0 if plan.quick else 10.0
    loop = asyncio.get_running_loop()
    attacker = RTCPeerConnection()
    attacker.addTrack(UnpacedTone(gap_s=0.002))
    try:
        async with http_from(STRANGER) as http:
            status, session_id = await connect_peer(attacker, http, server.url)
            if session_id is None:
                return {"attacker_offer": status}
            await asyncio.sleep(1.0)
            before, t0 = await get_session(http, server.url, session_id), loop.time()
            call = await legit_call(server.url, seconds, fetch_summary=True)
            after, t1 = await get_session(http, server.url, session_id), loop.time()
    finally:
        await close_all([attacker])

    def per_s(figure: Callable[[dict], int | None]) -> float | None:
        a, b = figure(before), figure(after)
        return None if a is None or b is None else round((b - a) / (t1 - t0), 1)

    receive = after.get("receive") or {}
    return {"attacker_frames_in_per_s": per_s(lambda s: s.get("frames_in")),
            "attacker_frames_out_per_s": per_s(lambda s: s.get("frames_out")),
            "attacker_dropped_per_s": per_s(lambda s: s.get("frames_dropped")),
            "attacker_packets_per_s": per_s(lambda s: (s.get("receive") or {}).get("packets")),
            "attacker_over_real_time": receive.get("frames_over_real_time", "n/a"),
            "attacker_ended": after.get("end_kind") if after.get("ended") else False,
            "legit": call.outcome, "legit_reply_s": f"{call.reply_s}/{seconds:.1f} sent",
            **{f"legit_{k}": v for k, v in receive_figures(call.summary).items()}}


async def many_mlines(server: Server, plan: Plan) -> dict:
    """5 offers with 400 extra audio sections each, from 127.0.0.2, during a legitimate 12.5 s call: their
    statuses, the server's CPU seconds over the row, the call's reply audio and loop stalls."""
    seconds = 12.5
    sdp = many_audio_sections(await aiortc_offer(), 400)
    cpu0 = server.cpu_s()
    legit = asyncio.ensure_future(legit_call(server.url, seconds, fetch_summary=True))
    statuses: collections.Counter[str] = collections.Counter()
    answer_s: list[float] = []
    await asyncio.sleep(1.5)  # the legitimate call is connected by now
    async with http_from(STRANGER) as http:
        for _ in range(5):
            began = time.monotonic()
            try:
                status, _, _ = await post_offer(http, server.url, sdp)
            except (aiohttp.ClientError, TimeoutError) as exc:
                status = type(exc).__name__
            statuses[str(status)] += 1
            answer_s.append(round(time.monotonic() - began, 2))
    call = await asyncio.wait_for(legit, seconds + 40)
    return {"statuses": dict(statuses), "answer_s": answer_s, "server_cpu_s": round(server.cpu_s() - cpu0, 2),
            "legit": call.outcome, "legit_reply_s": f"{call.reply_s}/{seconds}",
            "legit_loop_stalls": receive_figures(call.summary)["loop_stalls"]}


async def many_candidates(server: Server, plan: Plan) -> dict:
    """One offer with 800 host candidates at 127.0.0.2:20000-20799, where this process counts the STUN
    packets it receives for 12 s."""
    loop = asyncio.get_running_loop()
    hits: collections.Counter[int] = collections.Counter()

    class Counting(asyncio.DatagramProtocol):
        def __init__(self, port: int):
            self.port = port

        def datagram_received(self, data: bytes, addr: tuple) -> None:
            if len(data) >= 20 and data[4:8] == b"\x21\x12\xa4\x42":  # the STUN magic cookie
                hits[self.port] += 1

    transports = []
    try:
        for port in range(20000, 20800):
            with contextlib.suppress(OSError):
                transport, _ = await loop.create_datagram_endpoint(lambda p=port: Counting(p),
                                                                   local_addr=(STRANGER, port))
                transports.append(transport)
        lines = candidate_lines(800, lambda i: STRANGER, lambda i: 20000 + i)
        sdp = (await aiortc_offer()).replace("a=end-of-candidates\r\n", lines + "a=end-of-candidates\r\n", 1)
        async with http_from(STRANGER) as http:
            status, body, _ = await post_offer(http, server.url, sdp)
            await asyncio.sleep(12.0)
    finally:
        for transport in transports:
            transport.close()
    return {"status": status, "error": body.get("error", "")[:80] if status != 200 else "",
            "ports_listening": len(transports), "stun_packets": sum(hits.values()), "ports_hit": len(hits)}


async def patch_flood(server: Server, plan: Plan) -> dict:
    """A legitimate WHIP call; then from 127.0.0.2, 100 PATCHes of 1000 candidates each to its Location
    (distinct addresses on 127.1.x.y, where nothing listens), for at most 40 s (--quick 20 s): statuses,
    the server's RSS before and after, and the WHIP call's state afterwards."""
    loop = asyncio.get_running_loop()
    whip = WhipCall(server.url, 60.0)
    statuses: collections.Counter[str] = collections.Counter()
    try:
        await whip.start()
        rss_before = server.rss_mb()
        deadline = loop.time() + (20.0 if plan.quick else 40.0)
        began = loop.time()
        async with http_from(STRANGER) as http:
            for n in range(100):
                if loop.time() > deadline:
                    break
                body = f"a=mid:{whip.mid}\r\n" + candidate_lines(
                    1000, lambda i, n=n: f"127.1.{n}.{1 + i // 250}", lambda i: 20000 + i % 250, prefix=f"p{n}x")
                try:
                    async with http.patch(server.url + whip.location, data=body,
                                          headers={"Content-Type": SDPFRAG}) as response:
                        statuses[str(response.status)] += 1
                        await response.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    statuses[type(exc).__name__] += 1
        took = loop.time() - began
        await asyncio.sleep(1.0)
        rss_after = server.rss_mb()
        state = whip.pc.connectionState
        async with http_from(LEGIT) as http:
            summary = await get_session(http, server.url, whip.location.rsplit("/", 1)[1])
    finally:
        await whip.close()
    ended = f"ended {summary.get('end_kind')}: {summary.get('end_reason')}" if summary.get("ended") else "up"
    return {"statuses": dict(statuses), "sent": sum(statuses.values()), "took_s": round(took, 1),
            "rss_mb": f"{rss_before} -> {rss_after}", "whip_call": f"{state} (server: {ended})"}


async def endless_dc_message(server: Server, plan: Plan) -> dict:
    """A connected attacker (127.0.0.2) starts a message on `events` that never ends and feeds it at up to
    1000 chunks/s (1.2 MB/s) for 10 s, beside a legitimate 12 s call: how the attacker's call ended, the
    server's CPU seconds over the row, the legitimate call's reply audio."""
    loop = asyncio.get_running_loop()
    attacker = RTCPeerConnection()
    voice = OutboundAudioTrack(sample_rate=48000, max_buffer_ms=40_000)
    voice.push(tone(30.0))
    attacker.addTrack(voice)
    channel = attacker.createDataChannel("events")
    opened = asyncio.Event()
    channel.on("open", opened.set)
    queued = 0
    try:
        async with http_from(STRANGER) as http:
            status, session_id = await connect_peer(attacker, http, server.url)
            if session_id is None:
                return {"attacker_offer": status}
            await asyncio.wait_for(opened.wait(), 15)
            cpu0 = server.cpu_s()
            legit = asyncio.ensure_future(legit_call(server.url, 12.0))
            crafter = ChunkCrafter(attacker, channel.id)
            seq = crafter.next_stream_seq()
            fragment = b"x" * USERDATA_MAX_LENGTH
            crafter.queue(SCTP_DATA_FIRST_FRAG, fragment, seq)
            queued = 1
            began = loop.time()
            while (elapsed := loop.time() - began) < 10.0 and attacker.sctp is not None:
                while queued < 1000 * elapsed and len(attacker.sctp._outbound_queue) < 500:
                    crafter.queue(0, fragment, seq)  # neither the first nor the last fragment
                    queued += 1
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(attacker.sctp._transmit(), 5)
                await asyncio.sleep(0.02)
            call = await asyncio.wait_for(legit, 60)
            cpu = server.cpu_s() - cpu0
            summary = await get_session(http, server.url, session_id)
    finally:
        await close_all([attacker])
    ended = f"{summary.get('end_kind')}: {summary.get('end_reason')}" if summary.get("ended") else (
        f"not ended (server connection: {summary.get('connection', summary.get('status'))})")
    return {"attacker_call": ended, "chunks_queued": queued, "server_cpu_s": round(cpu, 2),
            "legit": call.outcome, "legit_reply_s": f"{call.reply_s}/12.0"}


async def options_preflight(server: Server, plan: Plan) -> dict:
    """300 same-origin CORS preflights (OPTIONS /whip, Access-Control-Request-Method: POST) without the token,
    from 127.0.0.2, against a server with --api-token and TURN REST credentials: statuses, and how many answers
    carried TURN credentials in Link headers."""
    statuses: collections.Counter[str] = collections.Counter()
    leaked = 0
    headers = {"Origin": server.url, "Access-Control-Request-Method": "POST"}
    async with http_from(STRANGER) as http:
        for _ in range(300):
            try:
                async with http.options(f"{server.url}/whip", headers=headers) as response:
                    statuses[str(response.status)] += 1
                    links = response.headers.getall("Link", [])
                    leaked += any("username=" in link and "credential=" in link for link in links)
                    await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                statuses[type(exc).__name__] += 1
    return {"statuses": dict(statuses), "with_turn_credentials": f"{leaked}/300"}


async def bad_requests(server: Server, plan: Plan) -> dict:
    """Deeply nested JSON to /offer; malformed WHIP trickle on a live (trickling) WHIP call; an offer without a
    DTLS fingerprint: each status (a 5xx or a dropped connection counts as a failure)."""
    results: dict[str, str | int] = {}
    whip = WhipCall(server.url, 30.0)
    try:
        async with http_from(STRANGER) as http:
            nested = b"[" * 30_000 + b"]" * 30_000
            results["nested_json"] = await status_of(http.post(
                f"{server.url}/offer", data=nested, headers={"Content-Type": "application/json"}))
            await whip.start()
            good = "1 1 udp 2130706431 127.0.0.1 40000 typ host"
            fragments = {
                "patch_unparsable": f"a=mid:{whip.mid}\r\na=candidate:foo bar baz\r\n",
                "patch_no_mid": f"a=candidate:{good}\r\n",
                "patch_ip_999": f"a=mid:{whip.mid}\r\na=candidate:1 1 udp 2130706431 999.1.1.1 40000 typ host\r\n",
                "patch_port_70000": f"a=mid:{whip.mid}\r\na=candidate:1 1 udp 2130706431 127.0.0.1 70000 typ host\r\n",
            }
            for name, fragment in fragments.items():
                results[name] = await status_of(http.patch(server.url + whip.location, data=fragment,
                                                           headers={"Content-Type": SDPFRAG}))
            results["whip_call_after"] = whip.pc.connectionState
            no_fingerprint = re.sub(r"^a=fingerprint:.*\r\n", "", await aiortc_offer(), flags=re.MULTILINE)
            results["offer_no_fingerprint"] = await status_of(http.post(
                f"{server.url}/offer", json={"sdp": no_fingerprint, "type": "offer"}))
    finally:
        await whip.close()
    failures = [k for k, v in results.items() if k != "whip_call_after" and not (isinstance(v, int) and v < 500)]
    return {**results, "failures": len(failures)}


async def status_of(request: contextlib.AbstractAsyncContextManager[aiohttp.ClientResponse]) -> int | str:
    """A request's status, or the name of what went wrong instead."""
    try:
        async with request as response:
            await response.read()
            return response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_half_heads(port: int, count: int) -> tuple[list[socket.socket], collections.Counter[str]]:
    """`count` TCP connections from 127.0.0.2, each sending half a request head (blocking; run on a thread)."""
    sockets, failed = [], collections.Counter()
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(5.0)
        try:
            sock.bind((STRANGER, 0))
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"POST /offer HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            sock.setblocking(False)
            sockets.append(sock)
        except OSError as exc:
            failed[type(exc).__name__] += 1
            sock.close()
    return sockets, failed


def still_open(sock: socket.socket) -> str:
    """"open" if the server has neither closed nor answered this connection (a non-blocking read waits)."""
    try:
        data = sock.recv(4096)
    except BlockingIOError:
        return "open"
    except ConnectionResetError:
        return "reset"
    except OSError as exc:
        return type(exc).__name__
    return "eof" if not data else "answered"


async def half_open_http(server: Server, plan: Plan) -> dict:
    """1000 TCP connections from 127.0.0.2, each with half a request head; after 30 s (--quick 15 s) how many
    the server still holds open, its open fds, and whether a GET /status from 127.0.0.1 (one a second) got
    answered meanwhile."""
    loop = asyncio.get_running_loop()
    fds_before = server.open_fds()
    began = loop.time()
    sockets, failed = await asyncio.wait_for(asyncio.to_thread(open_half_heads, server.port, 1000), 120)
    opened_s = loop.time() - began
    try:
        await asyncio.sleep(1.0)
        fds_peak = server.open_fds()
        answered = tries = 0
        slowest = 0.0
        while loop.time() < began + plan.seconds:
            tries += 1
            asked = loop.time()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, \
                        http.get(f"{server.url}/status") as response:
                    await response.read()
                    answered += response.status == 200
            slowest = max(slowest, loop.time() - asked)
            await asyncio.sleep(max(0.0, asked + 1.0 - loop.time()))
        states = collections.Counter(still_open(sock) for sock in sockets)
        fds_end = server.open_fds()
    finally:
        for sock in sockets:
            sock.close()
    return {"connected": len(sockets), "connect_failed": dict(failed), "connect_s": round(opened_s, 1),
            f"after_{plan.seconds:.0f}s": dict(states), "still_open": states.get("open", 0),
            "server_fds": f"{fds_before} -> {fds_peak} -> {fds_end} (limit {server.fd_limit()})",
            "legit_status": f"{answered}/{tries} answered (slowest {slowest:.2f} s)"}


@dataclass
class Row:
    run: Callable[[Server, Plan], Awaitable[dict]]
    flags: tuple[str, ...] = ()  # extra serve flags, passed where the checkout takes them


ROWS: dict[str, Row] = {
    "never_connect": Row(never_connect),
    "never_connect_2": Row(never_connect_2),
    "four_sparse_calls": Row(four_sparse_calls),
    "ten_x_rtp": Row(ten_x_rtp),
    "many_mlines": Row(many_mlines),
    "many_candidates": Row(many_candidates),
    "patch_flood": Row(patch_flood),
    "endless_dc_message": Row(endless_dc_message),
    "options_preflight": Row(options_preflight, ("--api-token", "t0ken", "--turn-url", "turn:127.0.0.1:3478",
                                                 "--turn-secret", "s3cret")),
    "bad_requests": Row(bad_requests),
    "half_open_http": Row(half_open_http),
}


# -- running -----------------------------------------------------------------------------------------------------


def supported(flags: tuple[str, ...], help_text: str) -> tuple[list[str], list[str]]:
    """(the flags with their values that `help_text` names, the flag names it does not)."""
    kept, dropped = [], []
    for i in range(0, len(flags), 2):
        name, value = flags[i], flags[i + 1]
        if re.search(rf"(^|\s|,){re.escape(name)}\b", help_text):
            kept += [name, value]
        else:
            dropped.append(name)
    return kept, dropped


def start_server(checkout: Path, row: str, help_text: str) -> tuple[Server, dict]:
    """Start the row's server; with TURN flags it refuses, start it without them and say so."""
    flags, dropped = supported(ROWS[row].flags, help_text)
    notes: dict = {"flags_not_supported": dropped} if dropped else {}
    server = Server(checkout, flags)
    try:
        server.start()
    except RuntimeError as exc:
        server.stop()
        if "--turn-url" not in flags:
            raise
        turn = ("--turn-url", "--turn-secret")
        without = [f for pair in zip(flags[::2], flags[1::2], strict=True) if pair[0] not in turn for f in pair]
        notes["turn_flags_dropped"] = str(exc)[:300]
        server = Server(checkout, without)
        server.start()
    return server, notes


def measure(checkout: Path, label: str, row: str, plan: Plan, help_text: str) -> dict:
    """One row against one checkout, on its own fresh server and event loop; errors are recorded."""
    result: dict = {"row": row, "checkout": label, "path": str(checkout)}

    def start() -> Server:
        server, notes = start_server(checkout, row, help_text)
        result.update(notes)
        return server

    return run_on_server(result, start, lambda server: ROWS[row].run(server, plan), ROW_LIMIT_S)


def run_on_server(result: dict, start: Callable[[], Server], play: Callable[[Server], Awaitable[dict]],
                  limit_s: float) -> dict:
    """Start a server, run `play(server)` on a fresh event loop from LEGIT's address within `limit_s`, and
    record in `result` its figures (or why it failed: the bench goes on, not on Ctrl-C), the problems in the
    server's log and the seconds it all took; the server is stopped after."""
    began = time.monotonic()
    server: Server | None = None
    try:
        server = start()

        async def run() -> dict:
            use_host_addresses([LEGIT])
            return await asyncio.wait_for(play(server), limit_s)

        result["figures"] = asyncio.run(run())
    except BaseException as exc:
        result["figures"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        if isinstance(exc, KeyboardInterrupt):
            raise
    finally:
        if server is not None:
            server.stop()
            result["server_log_problems"] = len(server.problems)
            if server.problems:
                result["server_log_first_problem"] = server.problems[0]
        result["seconds"] = round(time.monotonic() - began, 1)
    return result


def figures_text(figures: dict) -> str:
    return "; ".join(f"{k}={json.dumps(v) if isinstance(v, dict | list) else v}" for k, v in figures.items())


def markdown(results: list[dict]) -> str:
    lines = ["| row | checkout | figures |", "|---|---|---|"]
    for r in results:
        figures = figures_text(r["figures"])
        if r.get("server_log_problems"):
            figures += f"; server_log_errors={r['server_log_problems']}"
        if r.get("turn_flags_dropped"):
            figures += "; (TURN flags dropped: the server refused them)"
        lines.append(f"| {r['row']} | {r['checkout']} | {figures.replace('|', '/')} |")
    return "\n".join(lines)


def chosen(parser: argparse.ArgumentParser, text: str | None, known, what: str) -> list[str]:
    """The comma-separated names in `text` (all of `known` without it); an unknown one is a usage error."""
    names = text.split(",") if text else list(known)
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown {what}: {', '.join(unknown)}")
    return names


def side_by_side(checkouts: list[Path], items: list, measure: Callable[[Path, str, object, str], dict],
                 out: Path | None) -> tuple[list[dict], dict[Path, str]]:
    """`measure(checkout, label, item, serve_help)` for each item on every checkout in turn (alternating: a
    noisy machine hits both alike); each result printed, and appended to `out`, as a JSON line. Returns the
    results and each checkout's label."""
    labels = {c: describe_checkout(c) for c in checkouts}
    helps = {c: serve_help(c) for c in checkouts}
    results = []
    for item in items:
        for checkout in checkouts:
            result = measure(checkout, labels[checkout], item, helps[checkout])
            results.append(result)
            line = json.dumps(result)
            print(line, flush=True)
            if out:
                with out.open("a") as file:
                    file.write(line + "\n")
    return results, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, action="append", help="a server checkout (repeatable)")
    parser.add_argument("--rows", help=f"comma-separated, of: {', '.join(ROWS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="about half the time a row")
    parser.add_argument("--out", type=Path, help="append each measurement here as a JSON line")
    args = parser.parse_args()
    checkouts = [c.resolve() for c in args.checkout or [ROOT]]
    rows = chosen(parser, args.rows, ROWS, "rows")
    raise_fd_limit()  # 1000 half-open connections and 800 UDP sockets
    plan = Plan(seconds=15.0 if args.quick else 30.0, quick=args.quick)
    began = time.monotonic()
    results, _ = side_by_side(checkouts, rows, lambda checkout, label, row, help_text: measure(
        checkout, label, row, plan, help_text), args.out)
    print(f"\n{markdown(results)}\n\n{len(results)} measurements in {time.monotonic() - began:.0f} s"
          f"{' (--quick)' if args.quick else ''}", flush=True)


if __name__ == "__main__":
    main()
