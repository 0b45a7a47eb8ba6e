"""TURN health and a fast answer whatever TURN does: a real coturn on 127.0.0.1, up, unreachable or refusing.

- The TURN check is a real Allocate: ok against coturn, `unreachable` on a closed port,
  `unauthorized` with the wrong secret; `/readyz`, `/status` and `/metrics` say which.
- With policy `all` the server's own peer never contacts TURN (a UDP "black hole" that
  would swallow its Allocate hears nothing), so its answer cannot wait on it.
- Relay-only with TURN down: an offer (`/offer`, WHIP, through a media worker's front)
  is refused at once with a 503 that says why, leaving nothing behind.
- aiortc's one-STUN-one-TURN rule: the extra URLs are named at start-up; callers still get all.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiortc import RTCPeerConnection
from conftest import TURN_SECRET as SECRET
from conftest import TURNSERVER, Coturn, connect, free_udp_port, start_server, stop_server
from test_call_e2e import tone

from server.caller import place_call
from server.cli import ice_warnings
from server.engine.setup import create_engine
from server.media.ice import IceConfig, IceServer, parse_ice_server
from server.media.turn_check import check_turn
from server.media.workers import MediaWorkers
from server.model.source import ModelSource
from server.worker import worker_main
from signaling.app import SignalingConfig, SignalingService

pytestmark = pytest.mark.skipif(TURNSERVER is None, reason="Debian's coturn is not installed (./run test installs it)")

ROOT = Path(__file__).resolve().parent.parent
SERVE = [sys.executable, "-m", "server.cli", "serve"]  # this checkout's code, whatever is installed
CANDIDATE_TYPES = re.compile(r"^a=candidate:.* typ (\w+)", re.MULTILINE)


def turn_ice(url: str, secret: str = SECRET, relay_only: bool = False) -> IceConfig:
    return IceConfig(turn_urls=(url,), turn_secret=secret, turn_ttl_s=600, relay_only=relay_only)


def closed_turn_url() -> str:
    return f"turn:127.0.0.1:{free_udp_port()}?transport=udp"  # nobody listens there: no answer ever


class BlackHole(asyncio.DatagramProtocol):
    """A UDP port that takes every datagram and answers none: an unreachable TURN server that keeps count."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagram_received(self, data: bytes, addr) -> None:
        self.received.append(data)


@pytest.fixture
async def black_hole():
    transport, hole = await asyncio.get_running_loop().create_datagram_endpoint(
        BlackHole, local_addr=("127.0.0.1", 0))
    hole.url = "turn:127.0.0.1:{}?transport=udp".format(transport.get_extra_info("sockname")[1])
    yield hole
    transport.close()


def allocation_users(coturn: Coturn) -> list[str]:
    """Who got a relay from coturn (its log names the TURN REST username `expiry:name`)."""
    users = []
    for line in coturn.allocations():
        found = re.search(r"user <\d+:([^>]*)>", line)
        users.append(found.group(1) if found else line)
    return users


async def get(url: str) -> tuple[int, dict | str]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, body


def echo_engine():
    return create_engine(ModelSource("echo"), max_calls=1)


# -- the check itself --------------------------------------------------------------------------


async def test_the_turn_check_allocates_a_real_relay_and_names_each_failure(coturn):
    up = await check_turn(turn_ice(coturn.url))
    assert up.up and up.outcome == "ok" and up.detail.startswith("relay at 127.0.0.1:")
    assert allocation_users(coturn) == ["moshi-webrtc-check"]  # a real Allocate with issued credentials

    wrong = await check_turn(turn_ice(coturn.url, secret="not-the-secret"))
    assert not wrong.up and wrong.outcome == "unauthorized" and "401" in wrong.detail
    assert "--turn-secret" in wrong.detail

    closed = await check_turn(turn_ice(closed_turn_url()), timeout_s=0.5)
    assert not closed.up and closed.outcome == "unreachable" and "no answer" in closed.detail

    assert await check_turn(IceConfig()) is None  # no TURN configured: nothing to check


async def test_a_static_turn_password_is_checked_too(coturn):
    from server.media.turn import turn_rest_credentials

    username, password = turn_rest_credentials(SECRET, "static", 600)
    good = IceConfig((IceServer((coturn.url,), username, password),))
    bad = IceConfig((IceServer((coturn.url,), username, "wrong"),))
    assert (await check_turn(good)).up
    assert (await check_turn(bad)).outcome == "unauthorized"


# -- what operators see ------------------------------------------------------------------------


async def test_turn_up_shows_in_readyz_status_and_metrics(coturn):
    server = await start_server(echo_engine(), SignalingConfig(ice=turn_ice(coturn.url, relay_only=True)))
    try:
        state = await server.service.turn.settled()
        assert state.up
        status, ready = await get(f"{server.url}/readyz")
        assert status == 200 and ready["turn"]["up"] is True and ready["turn"]["outcome"] == "ok"
        _, info = await get(f"{server.url}/status")
        assert info["turn"]["url"] == coturn.url
        _, metrics = await get(f"{server.url}/metrics")
        assert "moshi_turn_up 1.0" in metrics and 'moshi_turn_state{outcome="ok"} 1.0' in metrics
        assert 'moshi_turn_checks_total{outcome="ok"} 1.0' in metrics
    finally:
        await stop_server(server)


@pytest.mark.parametrize("case", ["unreachable", "unauthorized"])
async def test_relay_only_with_turn_down_is_not_ready_and_refuses_offers_at_once(coturn, case):
    url, secret = (closed_turn_url(), SECRET) if case == "unreachable" else (coturn.url, "not-the-secret")
    config = SignalingConfig(ice=turn_ice(url, secret, relay_only=True), turn_check_timeout_s=0.5)
    server = await start_server(echo_engine(), config)
    try:
        await server.service.turn.settled()
        status, ready = await get(f"{server.url}/readyz")
        assert status == 503 and f"TURN is {case}" in ready["reason"] and ready["turn"]["up"] is False
        _, metrics = await get(f"{server.url}/metrics")
        assert "moshi_turn_up 0.0" in metrics and f'moshi_turn_state{{outcome="{case}"}} 1.0' in metrics

        pc = RTCPeerConnection(IceConfig().rtc_configuration())
        pc.addTransceiver("audio")
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{server.url}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as r:
                offer_status, offer_body, retry = r.status, await r.json(), r.headers.get("Retry-After")
            async with http.post(f"{server.url}/whip", data=pc.localDescription.sdp,
                                 headers={"Content-Type": "application/sdp"}) as r:
                whip_status, whip_body = r.status, await r.json()
        await pc.close()
        assert offer_status == 503 and retry is not None
        assert f"relay-only calls need TURN, and TURN is {case}" in offer_body["error"]
        assert whip_status == 503 and f"TURN is {case}" in whip_body["error"]
        _, metrics = await get(f"{server.url}/metrics")
        assert 'moshi_calls_rejected_total{reason="no_relay"} 2.0' in metrics
        assert not server.service.sessions and server.engine.free_slots == 1  # no peer, no slot taken
    finally:
        await stop_server(server)


async def test_policy_all_stays_ready_with_turn_down_and_says_so():
    config = SignalingConfig(ice=turn_ice(closed_turn_url()), turn_check_timeout_s=0.5)
    server = await start_server(echo_engine(), config)
    try:
        await server.service.turn.settled()
        status, ready = await get(f"{server.url}/readyz")
        assert status == 200 and ready["turn"]["outcome"] == "unreachable"  # direct calls still work
    finally:
        await stop_server(server)


# -- the server's peer and TURN ----------------------------------------------------------------


async def test_with_policy_all_the_servers_peer_answers_with_host_candidates_and_never_asks_turn(black_hole):
    config = SignalingConfig(ice=turn_ice(black_hole.url), turn_check_interval_s=None)  # only the peer could ask
    server = await start_server(echo_engine(), config)
    pc = RTCPeerConnection(IceConfig().rtc_configuration())
    connected = asyncio.Event()

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState == "connected":
            connected.set()

    try:
        pc.addTransceiver("audio")
        session = await connect(server, pc)
        assert set(CANDIDATE_TYPES.findall(session.pc.localDescription.sdp)) == {"host"}
        await connected.wait()
        assert black_hole.received == []  # the server's peer never sent TURN a single packet
    finally:
        await pc.close()
        await stop_server(server)


async def test_with_policy_all_a_relayed_caller_reaches_the_servers_host_candidate(coturn):
    server = await start_server(echo_engine(), SignalingConfig(ice=turn_ice(coturn.url)))
    try:
        recording = await place_call(server.url, tone(440, 1.0), tail_s=0.3, relay_only=True)  # ICE from the server
        _, metrics = await get(f"{server.url}/metrics")
    finally:
        await stop_server(server)
    assert recording.connect_ms > 0 and 'moshi_calls_connected_total{path="relay"} 1.0' in metrics
    users = allocation_users(coturn)
    assert any(user.startswith("caller-") for user in users)  # the caller's relay carried the call
    assert set(users) <= {"moshi-webrtc-check"} | {u for u in users if u.startswith("caller-")}  # none for the peer


def test_the_servers_peer_uses_stun_and_turn_only_where_it_needs_them():
    ice = IceConfig((parse_ice_server("stun:127.0.0.1:3478"),), turn_urls=("turn:127.0.0.1:3478",), turn_secret="s")
    assert ice.server_rtc_configuration("s1").iceServers == []
    relay = IceConfig(ice.servers, ice.turn_urls, "s", relay_only=True).server_rtc_configuration("s1")
    assert relay.iceServers and relay.iceTransportPolicy.value == "relay"
    old = IceConfig(ice.servers, ice.turn_urls, "s", server_gathers=True).server_rtc_configuration("s1")
    assert [s.urls for s in old.iceServers] == [["turn:127.0.0.1:3478"], ["stun:127.0.0.1:3478"]]
    assert len(ice.rtc_configuration("caller").iceServers) == 2  # callers keep everything


# -- aiortc's one STUN, one TURN ---------------------------------------------------------------


def test_urls_aiortc_ignores_are_named_and_callers_still_get_them_all():
    ice = IceConfig((parse_ice_server("stun:a.example:3478"), parse_ice_server("stun:b.example:3478"),
                     parse_ice_server("turns:u:p@t.example:443?transport=tcp")),
                    turn_urls=("turn:t.example:3478?transport=udp", "turn:t.example:3478?transport=tcp"),
                    turn_secret="s")
    assert ice.turn_target("n").url == "turn:t.example:3478?transport=udp"
    assert ice.unused_by_aiortc() == ["turn:t.example:3478?transport=tcp", "stun:b.example:3478",
                                      "turns:t.example:443?transport=tcp"]
    (warning,) = ice_warnings(ice)
    assert "stun:b.example:3478" in warning and "turns:t.example:443?transport=tcp" in warning
    assert ice_warnings(IceConfig(turn_urls=("turn:t.example:3478",), turn_secret="s")) == []
    assert len(ice.urls_for("caller-x")) == 5  # GET /ice-servers and WHIP's Link headers list all five


async def test_ice_servers_hand_callers_every_url(coturn):
    ice = IceConfig((parse_ice_server("stun:127.0.0.1:3478"),),
                    turn_urls=(coturn.url, "turn:127.0.0.1:1?transport=tcp"), turn_secret=SECRET)
    server = await start_server(echo_engine(), SignalingConfig(ice=ice))
    try:
        _, body = await get(f"{server.url}/ice-servers")
    finally:
        await stop_server(server)
    assert [url for s in body["iceServers"] for url in s["urls"]] == [
        coturn.url, "turn:127.0.0.1:1?transport=tcp", "stun:127.0.0.1:3478"]


def test_serve_warns_about_ignored_urls_and_refuses_a_malformed_one():
    env = dict(os.environ, NO_TORCH_COMPILE="1", PYTHONPATH=str(ROOT))
    bad = subprocess.run([*SERVE, "--model", "echo", "--port", "0", "--turn-url", "turn:", "--turn-secret", "s"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert bad.returncode == 2 and "'turn:' is not a STUN/TURN URL" in bad.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [*SERVE, "--model", "echo", "--port", str(port), "--media-workers", "0",
         "--ice-host-address", "127.0.0.1", "--turn-secret", "s", "--turn-url", "turn:127.0.0.1:9?transport=udp",
         "--turn-url", "turns:127.0.0.1:443?transport=tcp"],
        stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        log = []
        for line in server.stderr:  # start-up is announced on stderr; wait for it
            log.append(line)
            if "ready for" in line:
                break
        text = "".join(log)
        assert "aiortc uses only the first STUN and the first TURN URL" in text
        assert "ignores turns:127.0.0.1:443?transport=tcp" in text
    finally:
        server.terminate()
        server.wait(timeout=30)


# -- with media workers: the front refuses ----------------------------------------------------


async def test_the_front_refuses_relay_only_offers_when_turn_is_down_before_any_worker_sees_them():
    engine = create_engine(ModelSource("echo"), max_calls=1)
    await engine.start()
    config = SignalingConfig(ice=turn_ice(closed_turn_url(), relay_only=True), turn_check_timeout_s=0.5)
    workers = MediaWorkers(engine, 1, config, worker_main, host_addresses=["127.0.0.1"], log_level="WARNING")
    await workers.start()
    service = SignalingService(engine, config, workers=workers)
    runner = web.AppRunner(service.app())
    await runner.setup()
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    await web.SockSite(runner, listening).start()
    url = f"http://127.0.0.1:{listening.getsockname()[1]}"
    try:
        pc = RTCPeerConnection(IceConfig().rtc_configuration())
        pc.addTransceiver("audio")
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as r:
                status, body = r.status, await r.json()
            async with http.options(f"{url}/whip") as r:
                options_status = r.status  # WHIP's OPTIONS is no offer: the front answers it
        await pc.close()
        assert status == 503 and "TURN is unreachable" in body["error"]
        assert options_status == 204
        assert workers.host.calls_held() == 0 and engine.free_slots == 1
        _, metrics = await get(f"{url}/metrics")
        assert 'moshi_calls_rejected_total{reason="no_relay"} 1.0' in metrics and "moshi_turn_up 0.0" in metrics
    finally:
        await workers.stop()
        await runner.cleanup()
        await engine.stop()
