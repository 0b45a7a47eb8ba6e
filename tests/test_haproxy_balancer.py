"""The shipped HAProxy configuration, end to end: Debian's haproxy with deploy/haproxy/haproxy.cfg as it is
(ports from the environment) in front of three real `serve` processes, called with real aiortc peers.

What it proves, in order (the tests share one fleet and run in file order; the last two change it):
new calls spread over the replicas and a full fleet answers 503 with Retry-After; a call's later requests
(WHIP PATCH and DELETE on the Location, /sessions/{id}) reach the replica its id names; a draining replica
gets no new calls while its own go on to their end, then exits 0 and comes back (a rolling update);
a killed replica ends only its own calls and the balancer stops sending it offers.

HAProxy's own view comes from its log: a health check that changes a server's state prints
"Server new_calls/r1 is DOWN, ..." or "... is UP, ...", and the tests wait on those lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from server.caller import CallRecording, CallRefused, place_call
from signaling.app import SERVER_RESTART

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy") or next(
    (path for path in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(path, os.X_OK)), None)
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="Debian's haproxy is not installed (./run test installs it)")

REPLICAS = ("r1", "r2", "r3")
MEDIA_WORKERS = {"r1": 0, "r2": 0, "r3": 1}  # r3's calls live in a media worker: ids r3.w0.<random>
BACKENDS = ("new_calls", "replicas")
SEND_RATE = 48000
HANG_GUARD_S = 60.0  # a wait that takes this long is hung, not slow
STATE_LINE = re.compile(r"Server (\w+)/(\w+) is (UP|DOWN)\b")
SDP = "application/sdp"
SDPFRAG = "application/trickle-ice-sdpfrag"


def speech(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SEND_RATE)) / SEND_RATE
    return (0.1 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_of(session_id: str) -> str:
    return session_id.split(".", 1)[0]


async def until(condition: Callable, poll_s: float = 0.1) -> None:
    """Wait for a condition other processes make true (no event to wait on exists there); hang-guarded."""
    async def wait() -> None:
        while not (await condition() if asyncio.iscoroutinefunction(condition) else condition()):
            await asyncio.sleep(poll_s)

    await asyncio.wait_for(wait(), HANG_GUARD_S)


class Process:
    """A child process in its own process group, its output read line by line in a thread."""

    def __init__(self, name: str):
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.changed = threading.Condition()

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        self.lines = []
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            with self.changed:
                self.lines.append(line)
                self.on_line(line)
                self.changed.notify_all()

    def on_line(self, line: str) -> None:
        pass

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, HANG_GUARD_S), f"{self.name}: {what}\n{self.log()}"

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        await asyncio.to_thread(self.wait_for, predicate, what)

    def log(self) -> str:
        return "".join(self.lines[-60:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """To the whole group: a replica's media workers go with it, as a container's processes do."""
        os.killpg(self.proc.pid, sig)

    async def exit_code(self) -> int:
        return await asyncio.wait_for(asyncio.to_thread(self.proc.wait), HANG_GUARD_S)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # anything left in its group (a media worker)
            os.killpg(self.proc.pid, signal.SIGKILL)


class Replica(Process):
    def __init__(self, name: str, port: int):
        super().__init__(name)
        self.port, self.url = port, f"http://127.0.0.1:{port}"

    def start(self) -> None:
        argv = [sys.executable, "-m", "server.cli", "serve", "--model", "echo", "--port", str(self.port),
                "--max-calls", "2", "--media-workers", str(MEDIA_WORKERS[self.name]), "--replica-id", self.name,
                "--drain-seconds", "120", "--ice-host-address", "127.0.0.1", "--trust-forwarded-for",
                # every call here comes from 127.0.0.1, which HAProxy passes on as X-Forwarded-For
                "--max-offers-per-minute", "0", "--max-calls-per-client", "0"]
        env = dict(os.environ, PYTHONPATH=str(ROOT), NO_TORCH_COMPILE="1")
        super().start(argv, env)

    def ready(self) -> bool:
        return any("ready for" in line for line in self.lines)


class Balancer(Process):
    """HAProxy; `state[(backend, server)]` is what its health checks last said ("UP" or "DOWN")."""

    def __init__(self, port: int, replica_ports: dict[str, int]):
        super().__init__("haproxy")
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.replica_ports = replica_ports
        self.state: dict[tuple[str, str], str] = {}

    def start(self) -> None:
        env = {key: value for key, value in os.environ.items() if not key.startswith("MOSHI_")}
        env.update(MOSHI_LB_ADDR="127.0.0.1", MOSHI_LB_PORT=str(self.port),
                   **{f"MOSHI_{name.upper()}_PORT": str(port) for name, port in self.replica_ports.items()})
        super().start([HAPROXY, "-db", "-f", str(CONFIG)], env)

    def on_line(self, line: str) -> None:
        found = STATE_LINE.search(line)
        if found:
            self.state[(found.group(1), found.group(2))] = found.group(3)

    def is_(self, state: str, servers, backends=BACKENDS) -> Callable[[], bool]:
        return lambda: all(self.state.get((backend, server)) == state for backend in backends for server in servers)


class Fleet:
    def __init__(self):
        ports = {name: free_port() for name in REPLICAS}
        self.replicas = {name: Replica(name, port) for name, port in ports.items()}
        self.balancer = Balancer(free_port(), ports)
        self.url = self.balancer.url

    def start(self) -> None:
        # HAProxy first: its first checks find nothing listening and mark every server DOWN, so each
        # replica's coming up is a line in its log ("... is UP"), whatever the timing.
        self.balancer.start()
        self.balancer.wait_for(self.balancer.is_("DOWN", REPLICAS), "every server down before the replicas run")
        for replica in self.replicas.values():
            replica.start()
        for replica in self.replicas.values():
            replica.wait_for(replica.ready, "never ready")
        self.balancer.wait_for(self.balancer.is_("UP", REPLICAS), "the health checks never saw every replica")

    def stop(self) -> None:
        for process in [*self.replicas.values(), self.balancer]:
            process.stop()

    def live(self) -> list[Replica]:
        return [replica for replica in self.replicas.values() if replica.alive()]

    async def calls_on(self, http: aiohttp.ClientSession, replica: Replica) -> int:
        async with http.get(replica.url + "/status") as response:
            return (await response.json())["active_sessions"]

    async def calls(self, http: aiohttp.ClientSession) -> dict[str, int]:
        return {replica.name: await self.calls_on(http, replica) for replica in self.live()}

    async def settled(self, http: aiohttp.ClientSession) -> None:
        """No call left anywhere, and HAProxy sees every live replica ready for new calls."""
        async def idle() -> bool:
            return sum((await self.calls(http)).values()) == 0

        await until(idle)
        await self.balancer.until(self.balancer.is_("UP", [r.name for r in self.live()]), "live replicas not up")


@pytest.fixture(scope="module")
def fleet():
    fleet = Fleet()
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def call(fleet: Fleet, seconds: float) -> asyncio.Future:
    return asyncio.ensure_future(place_call(fleet.url, speech(seconds), tail_s=0.3))


async def finished(calls: list[asyncio.Future]) -> list[CallRecording]:
    try:
        return await asyncio.wait_for(asyncio.gather(*calls), HANG_GUARD_S)
    finally:
        for pending in calls:
            pending.cancel()


def went_on_to_the_end(recording: CallRecording, seconds: float) -> bool:
    """The caller hung up at the end of its audio: nobody ended the call early, the replies kept coming."""
    return recording.end_reason != SERVER_RESTART and len(recording.audio) / 24000 > seconds - 0.5


class WhipCall:
    """A WHIP client: its offer without candidates (they are trickled later by PATCH), as browsers' WHIP
    libraries do; media connects to the replica directly, the signaling goes through the balancer."""

    def __init__(self):
        self.pc = RTCPeerConnection()
        self.pc.addTransceiver("audio", direction="sendrecv")
        self.connected = asyncio.Event()
        self.pc.on("connectionstatechange", self._on_state)
        self.location = ""

    def _on_state(self) -> None:
        if self.pc.connectionState == "connected":
            self.connected.set()

    async def post(self, http: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        self.full = self.pc.localDescription.sdp
        bare = re.sub(r"^a=(candidate:.*|end-of-candidates)\r\n", "", self.full, flags=re.MULTILINE)
        async with http.post(url + "/whip", data=bare.encode(), headers={"Content-Type": SDP}) as response:
            self.answer = await response.text()
            self.location = response.headers.get("Location", "")
            return response

    @property
    def session_id(self) -> str:
        return self.location.rsplit("/", 1)[1]

    def fragment(self) -> str:
        ufrag = re.search(r"a=ice-ufrag:(\S+)", self.full).group(1)
        pwd = re.search(r"a=ice-pwd:(\S+)", self.full).group(1)
        mid = re.search(r"^a=mid:(\S+)", self.full, re.MULTILINE).group(1)
        candidates = re.findall(r"^a=candidate:.*$", self.full, re.MULTILINE)
        assert candidates
        return f"a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\na=mid:{mid}\r\n" + "\r\n".join(candidates) + "\r\n"

    async def close(self) -> None:
        await self.pc.close()


async def whip_offer_lands_on(http: aiohttp.ClientSession, url: str) -> str | None:
    """One WHIP offer through the balancer, hung up at once: the replica that took it, or None if refused."""
    whip = WhipCall()
    try:
        response = await whip.post(http, url)
        if response.status != 201:
            return None
        async with http.delete(url + whip.location) as deleted:
            assert deleted.status == 200, await deleted.text()
        return replica_of(whip.session_id)
    finally:
        await whip.close()


async def test_new_calls_spread_over_the_replicas_and_a_full_fleet_answers_503_with_retry_after(fleet, http):
    await fleet.settled(http)
    calls = [call(fleet, 4.0) for _ in range(6)]

    async def all_six_up() -> bool:
        return sum((await fleet.calls(http)).values()) == 6

    await until(all_six_up)
    with pytest.raises(CallRefused) as refused:
        await place_call(fleet.url, speech(1.0))
    assert refused.value.status == 503 and refused.value.retry_after
    recordings = await finished(calls)
    assert Counter(replica_of(r.session_id) for r in recordings) == {"r1": 2, "r2": 2, "r3": 2}
    assert all(went_on_to_the_end(recording, 4.0) for recording in recordings)
    assert all(r.session_id.startswith("r3.w0.") for r in recordings if replica_of(r.session_id) == "r3")


async def test_whip_patch_delete_and_sessions_reach_the_replica_the_id_names(fleet, http):
    await fleet.settled(http)
    calls = [WhipCall() for _ in REPLICAS]
    try:
        for whip in calls:  # one after another: round robin over three ready replicas gives one each
            response = await whip.post(http, fleet.url)
            assert response.status == 201, whip.answer
            assert re.fullmatch(r"/whip/r[123]\.[\w.-]+", whip.location), whip.location
        assert sorted(replica_of(whip.session_id) for whip in calls) == list(REPLICAS)

        for whip in calls:
            await whip.pc.setRemoteDescription(RTCSessionDescription(sdp=whip.answer, type="answer"))
            async with http.patch(fleet.url + whip.location, data=whip.fragment(),
                                  headers={"Content-Type": SDPFRAG}) as response:
                assert response.status == 204, await response.text()  # another replica would answer 404
        for whip in calls:
            await asyncio.wait_for(whip.connected.wait(), HANG_GUARD_S)
            async with http.get(f"{fleet.url}/sessions/{whip.session_id}") as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["ended"] is False

        for whip in calls:
            async with http.delete(fleet.url + whip.location) as response:
                assert response.status == 200, await response.text()
            async with http.get(f"{fleet.url}/sessions/{whip.session_id}") as response:
                assert response.status == 200
                summary = await response.json()
            assert summary["session_id"] == whip.session_id and summary["end_kind"] == "hung_up"
            for replica in fleet.replicas.values():  # the call was on the named replica, and only there
                async with http.get(f"{replica.url}/sessions/{whip.session_id}") as response:
                    assert response.status == (200 if replica.name == replica_of(whip.session_id) else 404)
            async with http.delete(fleet.url + whip.location) as response:
                assert response.status == 404  # ended: the replica itself says so
    finally:
        for whip in calls:
            await whip.close()
    async with http.get(f"{fleet.url}/sessions/r9.nothing") as response:
        assert response.status == 404 and "names no replica" in (await response.json())["error"]


async def test_a_draining_replica_takes_no_new_calls_lets_its_own_finish_and_exits_0(fleet, http):
    await fleet.settled(http)
    first = [call(fleet, 4.0) for _ in range(3)]

    async def three_up() -> bool:
        return sum((await fleet.calls(http)).values()) == 3

    await until(three_up)
    held = await fleet.calls(http)
    draining = fleet.replicas[next(name for name in ("r1", "r2", "r3") if held[name])]
    others = [name for name in REPLICAS if name != draining.name]
    draining.signal(signal.SIGTERM)
    await fleet.balancer.until(lambda: fleet.balancer.state[("new_calls", draining.name)] == "DOWN",
                               "the draining replica stayed in rotation")

    # While it drains, two new calls (the free slots left on the others) land on the others.
    late = [call(fleet, 1.0) for _ in range(2)]
    late_recordings = await finished(late)
    assert all(replica_of(r.session_id) in others for r in late_recordings), [r.session_id for r in late_recordings]
    assert all(went_on_to_the_end(recording, 1.0) for recording in late_recordings)
    assert fleet.balancer.state[("replicas", draining.name)] == "UP"  # alive: its calls' requests still reach it

    recordings = await finished(first)
    assert all(went_on_to_the_end(recording, 4.0) for recording in recordings)
    assert held[draining.name] == sum(replica_of(r.session_id) == draining.name for r in recordings)
    assert await draining.exit_code() == 0, draining.log()
    assert "draining" in draining.log() and "drain time is up" not in draining.log()

    # A rolling update: the same id and port again; the balancer takes it back once it is ready.
    draining.start()
    await draining.until(draining.ready, "never ready again")
    await fleet.balancer.until(fleet.balancer.is_("UP", [draining.name]), "the restarted replica never came back")


async def test_a_killed_replica_ends_only_its_own_calls_and_gets_no_more_offers(fleet, http):
    await fleet.settled(http)
    calls = [call(fleet, 4.0) for _ in range(4)]

    async def four_up() -> bool:
        return sum((await fleet.calls(http)).values()) == 4

    await until(four_up)
    held = await fleet.calls(http)
    victim = fleet.replicas[next(name for name in ("r2", "r1", "r3") if held[name])]
    live = [name for name in REPLICAS if name != victim.name]
    victim.signal(signal.SIGKILL)
    assert await victim.exit_code() == -signal.SIGKILL

    recordings = await finished(calls)
    killed = [r for r in recordings if replica_of(r.session_id) == victim.name]
    survived = [r for r in recordings if replica_of(r.session_id) != victim.name]
    assert len(killed) == held[victim.name] and survived
    for recording in killed:  # cut off: no goodbye, and the replies stopped before the caller was done
        assert recording.end_reason is None and len(recording.audio) / 24000 < 4.0 - 0.5
    assert all(went_on_to_the_end(recording, 4.0) for recording in survived)
    async with http.get(f"{fleet.url}/sessions/{killed[0].session_id}") as response:
        assert response.status == 503  # its replica is gone; no other replica is asked about its call

    await fleet.balancer.until(lambda: fleet.balancer.state[("new_calls", victim.name)] == "DOWN",
                               "the killed replica stayed in rotation")

    async def offers_go_through() -> bool:
        return await whip_offer_lands_on(http, fleet.url) is not None

    await until(offers_go_through)
    landed = [await whip_offer_lands_on(http, fleet.url) for _ in range(6)]
    assert all(name in live for name in landed), landed
    assert set(landed) == set(live)  # round robin over the two left
    recording = await place_call(fleet.url, speech(1.0), tail_s=0.3)  # and a real call still works end to end
    assert replica_of(recording.session_id) in live and went_on_to_the_end(recording, 1.0)
