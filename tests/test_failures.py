"""Calls that fail say why: ICE, DTLS, no media, no relay. Each is logged at WARNING with the session id,
counted in moshi_calls_ended_total by kind, sent as an `error` event when the channel still carries it,
and readable in GET /sessions/{id} for a while after the end. Real aiortc callers throughout; each fault is
a real one (a caller's own certificate or cipher list, an offer whose candidates nobody answers)."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import socket

import aiohttp
import aioice.ice
import aioice.stun
import pytest
from aiortc import RTCCertificate, RTCPeerConnection, RTCSessionDescription
from conftest import start_server, stop_server
from net_relay import UdpRelay
from test_operations import samples

from server.engine.setup import create_engine
from server.media import aiortc_compat
from server.model.source import ModelSource
from signaling.app import SignalingConfig
from signaling.ended import EndedSessions

FINGERPRINT = re.compile(r"^(a=fingerprint:sha-256 )(\S+)", re.MULTILINE)
CANDIDATE_PORT = re.compile(r"^(a=candidate:\S+ \d+ udp \d+ \S+ )(\d+)( typ host)", re.MULTILINE)


@pytest.fixture
async def server():
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1))
    yield server
    await stop_server(server)


def caller(certificate: RTCCertificate | None = None) -> RTCPeerConnection:
    """A caller as the page makes it: audio both ways and an `events` channel."""
    aiortc_compat.allow_rsa_dtls_peers()
    pc = RTCPeerConnection()
    if certificate is not None:
        aiortc_compat.use_certificate(pc, certificate)
    pc.addTransceiver("audio", direction="sendrecv")
    pc.createDataChannel("events")
    return pc


async def offer(server, pc: RTCPeerConnection, rewrite=lambda sdp: sdp, apply_answer: bool = True):
    """POST the caller's offer (rewritten) to /offer; returns the server's session."""
    await pc.setLocalDescription(await pc.createOffer())
    body = {"sdp": rewrite(pc.localDescription.sdp), "type": "offer"}
    async with aiohttp.ClientSession() as http, http.post(f"{server.url}/offer", json=body) as response:
        answer = await response.json()
        assert response.status == 200, answer
    session = server.service.sessions[answer["session_id"]]
    if apply_answer:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
    return session


async def read_session(server, session_id: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/sessions/{session_id}") as response:
        return response.status, await response.json()


async def assert_failed_and_said_why(server, session, kind: str, caplog) -> dict:
    """The call ended with `kind`, said so at WARNING with its id, counted it, left nothing behind, and
    GET /sessions/{id} shows why."""
    await asyncio.wait_for(session.ended.wait(), 60)  # a hang guard, not a timing
    assert session.end_kind == kind, (session.end_kind, session.end_reason)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and session.session_id in r.getMessage()]
    assert any(session.end_reason in message for message in warnings), warnings
    found = samples(server.service.metrics.render().decode())
    assert found[("moshi_calls_ended_total", (("reason", kind),))] == 1
    assert not server.service.sessions and server.engine.free_slots == 1  # no peer, no slot behind
    assert all(t.receiver.transport.transport.state == "closed" for t in session.pc.getTransceivers())
    status, summary = await read_session(server, session.session_id)
    assert status == 200 and summary["ended"] is True
    assert summary["end_kind"] == kind and summary["end_reason"] == session.end_reason
    return summary


async def test_a_caller_whose_certificate_does_not_match_its_offer_fails_dtls_and_says_why(server, caplog):
    pc = caller()
    forged = "AB:" * 31 + "AB"
    session = await offer(server, pc, lambda sdp: FINGERPRINT.sub(lambda m: m.group(1) + forged, sdp))
    try:
        summary = await assert_failed_and_said_why(server, session, "dtls_failed", caplog)
    finally:
        await pc.close()
    assert "does not match the a=fingerprint in its offer" in summary["end_reason"]
    assert forged in summary["end_reason"]
    actual = pc.localDescription.sdp  # the caller's real fingerprint is named too
    assert FINGERPRINT.search(actual).group(2) in summary["end_reason"]


class RsaSuitesOnly(RTCCertificate):
    """An ECDSA certificate whose DTLS offers only ECDHE-RSA suites, as a stack that knows RSA alone does:
    the server (the DTLS server, with its ECDSA certificate) has no suite it may pick."""

    def _create_ssl_context(self, *args, **kwargs):
        context = super()._create_ssl_context(*args, **kwargs)
        context.set_cipher_list(b"ECDHE-RSA-AES128-GCM-SHA256")
        return context


async def test_a_dtls_handshake_failure_carries_openssls_reason(server, caplog):
    pc = caller(RsaSuitesOnly.generateCertificate())
    session = await offer(server, pc)
    try:
        summary = await assert_failed_and_said_why(server, session, "dtls_failed", caplog)
    finally:
        await pc.close()
    assert summary["end_reason"] == "DTLS handshake failed: no shared cipher"


def closed_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def candidates_at(port: int):
    """An offer rewrite: the caller's host candidate points at `port` (a closed one: nobody answers checks)."""
    return lambda sdp: CANDIDATE_PORT.sub(lambda m: f"{m.group(1)}{port}{m.group(3)}", sdp)


async def end_reason_of_a_call_that_fails(server, rewrite, caplog) -> str:
    """Offer from a caller as the page makes it, rewritten, never applying the answer: the call must fail as
    ICE and say so everywhere (`assert_failed_and_said_why`); its reason."""
    pc = caller()
    session = await offer(server, pc, rewrite, apply_answer=False)
    try:
        summary = await assert_failed_and_said_why(server, session, "ice_failed", caplog)
    finally:
        await pc.close()
    return summary["end_reason"]


async def test_an_offer_whose_candidates_nobody_answers_fails_ice_and_says_why(server, caplog, monkeypatch):
    """The caller's only candidate points at a closed port and the caller never answers checks. aioice
    gives each check 7 tries over 63 s; two tries keep this short, and the failure is the same."""
    monkeypatch.setattr(aioice.stun, "RETRY_MAX", 1)
    port = closed_udp_port()
    reason = await end_reason_of_a_call_that_fails(server, candidates_at(port), caplog)
    assert reason.startswith("ICE failed: no candidate pair succeeded (1 pairs: 1 failed)"), reason
    assert f"host 127.0.0.1:{port}/udp" in reason


@pytest.fixture
async def impatient_server():
    """A short media timeout: the calls below never connect, and that is when they end."""
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1), SignalingConfig(media_timeout_s=1.5))
    yield server
    await stop_server(server)


CANDIDATE_LINE = re.compile(r"^a=(candidate:.*|end-of-candidates)\r?\n", re.MULTILINE)


async def test_an_offer_without_candidates_ends_at_the_media_timeout_saying_so(impatient_server, caplog):
    """A client that offers before gathering and never trickles: aioice would wait on it for ever."""
    reason = await end_reason_of_a_call_that_fails(impatient_server, lambda sdp: CANDIDATE_LINE.sub("", sdp), caplog)
    assert reason.startswith("the caller sent no ICE candidates in 1.5 s"), reason


async def test_candidates_nobody_answers_end_at_the_media_timeout_as_ice_not_as_silence(impatient_server, caplog):
    """aioice gives unanswered checks a minute; the call ends at the media timeout, and says it was ICE."""
    reason = await end_reason_of_a_call_that_fails(impatient_server, candidates_at(closed_udp_port()), caplog)
    assert reason.startswith("ICE did not connect in 1.5 s: no check succeeded"), reason


async def test_a_caller_whose_network_goes_away_fails_ice_consent_and_says_why(monkeypatch, caplog):
    """Connected through a relay that then vanishes (the caller's Wi-Fi gone), with a media timeout longer than
    aioice's consent expiry: the server's own consent checks go unanswered and the call ends as ICE, saying so.
    Consent checks every 0.2 s instead of 5 s keep it short; the expiry is the same six unanswered checks."""
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.2)
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1),  # no resume window: it ends
                                SignalingConfig(media_timeout_s=600.0, resume_window_s=0))
    relay = await UdpRelay().start()
    pc = caller()
    connected = asyncio.Event()
    pc.on("connectionstatechange", lambda: connected.set() if pc.connectionState == "connected" else None)
    session = await offer(server, pc, relay.offer, apply_answer=False)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=relay.answer(session.pc.localDescription.sdp),
                                                        type="answer"))
    try:
        await asyncio.wait_for(connected.wait(), 60)
        relay.close()  # every packet either way is lost from now on
        summary = await assert_failed_and_said_why(server, session, "ice_failed", caplog)
    finally:
        relay.close()
        await pc.close()
        await stop_server(server)
    assert summary["end_reason"] == ("ICE failed: the caller stopped answering ICE consent checks "
                                     "(its network went away)")


async def test_the_caller_closing_first_ends_the_call_quietly(server, caplog):
    """The caller's DTLS closes before its data channel does: the server's hang-up must not send `bye` on a
    channel with no transport under it (aiortc would log the failed send at ERROR from a task of its own)."""
    for _ in range(3):  # the order of the caller's closing messages varies; each turn must be quiet
        pc = RTCPeerConnection()
        pc.addTransceiver("audio", direction="sendrecv")
        ready = asyncio.Event()
        pc.createDataChannel("events").on("message", lambda message, ready=ready: ready.set())
        session = await offer(server, pc)
        await asyncio.wait_for(ready.wait(), 60)  # the server's `ready` came: its channel is open
        await pc.getTransceivers()[0].receiver.transport.stop()  # its DTLS: close_notify, nothing else
        await asyncio.wait_for(session.ended.wait(), 60)
        await pc.close()
        assert session.end_kind in ("caller_gone", "connection_closed")
        gc.collect()  # aiortc's failed send surfaces when its task is collected
        await asyncio.sleep(0)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    assert not server.service.sessions and server.engine.free_slots == 1


def test_ended_sessions_are_kept_for_a_while_and_at_most_so_many():
    now = {"t": 0.0}
    ended = EndedSessions(max_kept=2, keep_s=10.0, clock=lambda: now["t"])
    ended.add("a", {"end_reason": "one"})
    now["t"] = 5.0
    ended.add("b", {"end_reason": "two"})
    assert ended.get("a") == {"end_reason": "one"} and len(ended) == 2
    now["t"] = 6.0
    ended.add("c", {"end_reason": "three"})
    assert ended.get("a") is None and len(ended) == 2  # the oldest went first
    now["t"] = 15.0
    assert ended.get("b") is None and ended.get("c") == {"end_reason": "three"}  # b's 10 s are up, not c's
    now["t"] = 16.0
    assert len(ended) == 0


async def test_an_ended_session_reads_404_once_it_is_no_longer_kept():
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1),
                                SignalingConfig(media_timeout_s=5.0, ended_sessions_kept=0))
    pc = caller()
    session = await offer(server, pc)
    await session.hang_up("hung up")
    await pc.close()
    status, body = await read_session(server, session.session_id)
    assert status == 404 and "no such session" in body["error"]
    await stop_server(server)
