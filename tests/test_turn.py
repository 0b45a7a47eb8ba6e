"""TURN-backed calls through a real coturn on 127.0.0.1, with TURN REST credentials.

Every candidate is a relay candidate on both sides (iceTransportPolicy "relay"),
so the call's media can only flow through coturn; its log shows the allocations.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import aiohttp
import numpy as np
import pytest
from conftest import TURN_SECRET as SECRET
from conftest import TURNSERVER, Coturn, start_server, stop_server
from test_call_e2e import dbfs, tone
from test_operations import samples

from server.caller import CallFailed, place_call
from server.engine.setup import create_engine
from server.media.ice import IceConfig, IceServer
from server.media.turn import turn_rest_credentials
from server.model.source import ModelSource
from signaling.app import SignalingConfig

pytestmark = pytest.mark.skipif(TURNSERVER is None, reason="Debian's coturn is not installed (./run test installs it)")


def relay_ice(coturn: Coturn, secret: str = SECRET) -> IceConfig:
    return IceConfig(turn_urls=(coturn.url,), turn_secret=secret, turn_ttl_s=600, relay_only=True)


def test_turn_rest_credentials_follow_coturns_scheme():
    username, password = turn_rest_credentials("s3", "caller-1", ttl_s=600, now=1_000_000)
    assert username == "1000600:caller-1"
    assert password == base64.b64encode(hmac.new(b"s3", b"1000600:caller-1", hashlib.sha1).digest()).decode()


async def test_ice_servers_hand_out_short_lived_credentials_never_the_secret(coturn):
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1), SignalingConfig(ice=relay_ice(coturn)))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/ice-servers") as response:
            first = await response.json()
        async with http.get(f"{server.url}/ice-servers") as response:
            second = await response.json()
    await stop_server(server)
    (turn,) = first["iceServers"]
    assert turn["urls"] == [coturn.url] and first["iceTransportPolicy"] == "relay"
    expiry, name = turn["username"].split(":")
    assert abs(int(expiry) - (time.time() + 600)) < 5 and name.startswith("caller-")
    expected = base64.b64encode(hmac.new(SECRET.encode(), turn["username"].encode(), hashlib.sha1).digest()).decode()
    assert turn["credential"] == expected and SECRET not in str(first)
    assert second["iceServers"][0]["username"] != turn["username"]  # each client its own


async def test_a_relay_only_call_carries_audio_both_ways_through_coturn(coturn):
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1), SignalingConfig(ice=relay_ice(coturn)))
    recording = await place_call(server.url, tone(440, 2.0), tail_s=0.5, relay_only=True)  # ICE from /ice-servers
    metrics = server.service.metrics.render().decode()
    await stop_server(server)
    assert 'moshi_calls_connected_total{path="relay"} 1.0' in metrics  # operators see relay vs direct
    reply = recording.audio
    voiced = reply[np.abs(reply) > 0.02]
    assert voiced.size > 24000 and dbfs(voiced) == pytest.approx(-20, abs=3)  # it went there and came back
    assert len(coturn.allocations()) >= 2  # one relay for the caller, one for the server
    assert [e["type"] for e in recording.events][:1] == ["ready"]


async def test_a_wrong_or_expired_credential_fails_the_call_with_a_clear_error(coturn):
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1), SignalingConfig(ice=relay_ice(coturn)))
    expired_user, expired_password = turn_rest_credentials(SECRET, "caller-late", ttl_s=600, now=time.time() - 3600)
    for username, password in [("1999999999:caller", "not-the-password"), (expired_user, expired_password)]:
        with pytest.raises(CallFailed, match="no TURN relay candidate"):  # refused, not timed out
            await place_call(server.url, tone(440, 1.0), relay_only=True,
                             ice=IceConfig((IceServer((coturn.url,), username, password),)))
    assert not server.service.sessions and server.engine.free_slots == 1
    await stop_server(server)


@pytest.mark.parametrize("checked", [True, False])
async def test_a_server_with_the_wrong_secret_refuses_the_offer_and_keeps_nothing(coturn, checked, caplog):
    """With TURN checked (the default) the offer gets 503 at once; without the check, the server's peer
    finds out in its own gather and the offer gets 502: either way with the reason."""
    config = SignalingConfig(ice=relay_ice(coturn, secret="not-the-secret"),
                             turn_check_interval_s=30.0 if checked else None)
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1), config)
    caller_ice = IceConfig(turn_urls=(coturn.url,), turn_secret=SECRET)  # the caller's own relay works
    with pytest.raises(Exception) as refused:
        await place_call(server.url, tone(440, 1.0), relay_only=True, ice=caller_ice)
    if checked:
        assert getattr(refused.value, "status", None) == 503
        assert "TURN is unauthorized" in refused.value.message and "401" in refused.value.message
    else:
        assert getattr(refused.value, "status", None) == 502
        assert "no TURN relay candidate" in refused.value.message
    assert not server.service.sessions and server.engine.free_slots == 1
    found = samples(server.service.metrics.render().decode())
    assert found[("moshi_calls_rejected_total", (("reason", "no_relay"),))] == 1
    if checked:  # refused before any peer was made: nothing to read under a session id
        await stop_server(server)
        return
    # Said at WARNING with the session's id, counted, and readable for a while under that id.
    session_id = refused.value.session_id
    assert any(r.levelname == "WARNING" and session_id in r.getMessage() and "no TURN relay" in r.getMessage()
               for r in caplog.records)
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/sessions/{session_id}") as response:
        summary = await response.json()
    assert response.status == 200 and summary["end_kind"] == "no_relay"
    assert "no TURN relay candidate" in summary["end_reason"]
    await stop_server(server)
