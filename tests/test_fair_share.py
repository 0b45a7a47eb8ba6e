"""No one client can take every line: a share of the slots per client, and only a live stream keeps a call.

Attack clients are real: aiohttp from other loopback addresses (127.0.0.2, 127.0.0.3) with real aiortc
offers, and aiortc peers that send a packet now and then. Each test asserts what the legitimate caller
(127.0.0.1) gets meanwhile: a call with its audio.
"""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest
from aiortc import RTCPeerConnection
from attackers import SparseTrack, aiortc_offer
from conftest import connect, start_server, stop_server
from test_abuse import STRANGER, assert_a_caller_gets_through, from_address
from test_media_workers import start_front, stop_front

from server.engine.setup import create_engine
from server.model.source import ModelSource
from signaling.app import SignalingConfig, default_calls_per_client

SECOND_STRANGER = "127.0.0.3"


def test_the_default_share_leaves_lines_for_others_and_grows_with_the_server():
    assert [default_calls_per_client(n) for n in (1, 2, 4, 5, 8, 32, 64)] == [1, 1, 1, 2, 2, 8, 16]
    for n in range(1, 200):  # two strangers together never hold every line of a server with three or more
        assert n < 3 or 2 * default_calls_per_client(n) < n


async def offer_from(address: str, url: str) -> tuple[int, dict]:
    offer = {"sdp": await aiortc_offer(), "type": "offer"}
    async with from_address(address) as http, http.post(f"{url}/offer", json=offer) as response:
        return response.status, await response.json()


async def test_strangers_hold_at_most_their_share_and_a_caller_gets_in(caplog):
    """4 lines, a share of 1 each (the default): two strangers offering and never connecting hold 2 of
    them; their further offers get 429 that says why, counted and logged with the client."""
    server = await start_server(create_engine(ModelSource("echo"), max_calls=4),
                                SignalingConfig(media_timeout_s=5.0, connect_timeout_s=30.0))
    try:
        for address in (STRANGER, SECOND_STRANGER):
            status, _ = await offer_from(address, server.url)
            assert status == 200
            for _ in range(3):
                status, body = await offer_from(address, server.url)
                assert status == 429 and f"{address} already has 1 call" in body["error"]
        assert server.engine.free_slots == 2
        await assert_a_caller_gets_through(server)
        async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as response:
            assert 'moshi_calls_rejected_total{reason="client_limit"} 6.0' in await response.text()
        said = [r.getMessage() for r in caplog.records if "(client_limit)" in r.getMessage()]
        assert len(said) == 2  # once a client, though each made three such offers
        assert re.match(rf"refused {re.escape(SECOND_STRANGER)} \(client_limit\): .* at most 1 of the 4 lines",
                        said[1])
    finally:
        await stop_server(server)


async def test_a_strangers_slot_comes_back_when_its_call_ends_and_the_share_is_an_option():
    server = await start_server(create_engine(ModelSource("echo"), max_calls=4),
                                SignalingConfig(media_timeout_s=5.0, connect_timeout_s=1.0, max_calls_per_client=2))
    try:
        statuses = [(await offer_from(STRANGER, server.url))[0] for _ in range(3)]
        assert statuses == [200, 200, 429]
        for session in list(server.service.sessions.values()):
            await session.ended.wait()  # never connected: gone at the connect timeout
        assert (await offer_from(STRANGER, server.url))[0] == 200
    finally:
        await stop_server(server)


async def test_the_share_holds_across_media_workers():
    """The front forwards offers to two workers; the engine, in the front, counts one client's calls over
    both (the front tells each worker who calls), so a stranger cannot take a line in each worker."""
    front = await start_front(max_calls=4, worker_count=2,
                              config=SignalingConfig(media_timeout_s=5.0, connect_timeout_s=30.0))
    try:
        statuses = [(await offer_from(STRANGER, front.url))[0] for _ in range(4)]
        assert statuses == [200, 429, 429, 429]
        assert front.engine.free_slots == 3
        await assert_a_caller_gets_through(front)
    finally:
        await stop_front(front)


@pytest.fixture
async def server():
    running = await start_server(create_engine(ModelSource("echo"), max_calls=3),
                                 SignalingConfig(media_timeout_s=3.0, max_calls_per_client=0))
    yield running
    await stop_server(running)


async def call_with(server, track: SparseTrack):
    pc = RTCPeerConnection()
    pc.addTrack(track)
    session = await connect(server, pc)
    return pc, session


async def test_a_packet_now_and_then_does_not_hold_a_line_but_a_dtx_caller_keeps_it(server):
    """Media timeout 3 s, so a call needs 3 packets in any 3 s. One packet every 2 s ends as sparse_media
    (before, any packet within the timeout kept it, up to the maximum call length); a caller in silence
    with Opus DTX (a packet every 400 ms) keeps its call for as long as it likes."""
    sparse, dtx = SparseTrack(every_s=2.0), SparseTrack(every_s=0.4)
    sparse_pc, sparse_session = await call_with(server, sparse)
    dtx_pc, dtx_session = await call_with(server, dtx)
    try:
        await asyncio.wait_for(sparse_session.ended.wait(), 60)
        assert sparse_session.end_kind == "sparse_media"
        assert re.search(r"the caller sent [12] packet\(s\) in the last 3 s, fewer than a live audio stream \(3",
                         sparse_session.end_reason)
        assert sparse.sent >= 2  # it did send: "no media" would be a wrong diagnosis
        sent = dtx.sent
        await dtx.wait_sent(sent + 10)  # 4 s more of DTX, past another whole media timeout
        assert not dtx_session.ended.is_set() and dtx_session.receiver.stats.packets >= 10
        async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as response:
            assert 'moshi_calls_ended_total{reason="sparse_media"} 1.0' in await response.text()
        await assert_a_caller_gets_through(server)
    finally:
        await sparse_pc.close()
        await dtx_pc.close()
