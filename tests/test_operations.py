"""What an operator relies on: metrics, the API token, CORS, offer rate limits, call time limits,
and a caller who vanishes without a word."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from conftest import start_server, stop_server
from prometheus_client.parser import text_string_to_metric_families
from test_call_e2e import tone

from server.caller import CallRefused, place_call, write_wav
from server.engine.setup import create_engine
from server.model.source import ModelSource
from signaling.app import SignalingConfig
from signaling.guards import OfferRateLimit

BIN = Path(sys.executable).parent / "moshi-webrtc"
JSON = {"Content-Type": "application/json"}


def samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_count_calls_rejections_steps_levels_and_delay(echo_server):
    recording = await place_call(echo_server.url, tone(440, 1.5), tail_s=0.3)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{echo_server.url}/offer", data=b"{}", headers={"Content-Type": "application/json"}):
            pass
        async with http.get(f"{echo_server.url}/metrics") as response:
            assert response.status == 200 and response.content_type == "text/plain"
            found = samples(await response.text())
    assert recording.end_reason in (None, "hung up")
    assert found[("moshi_calls_started_total", ())] == 1
    assert found[("moshi_calls_ended_total", (("reason", "hung_up"),))] == 1
    assert found[("moshi_calls_rejected_total", (("reason", "bad_offer"),))] == 1
    assert found[("moshi_calls_active", ())] == 0
    assert found[("moshi_calls_connected_total", (("path", "direct"),))] == 1
    assert found[("moshi_engine_step_seconds_count", ())] >= 15  # one step per 80 ms frame of the call
    frames = found[("moshi_input_level_dbfs_count", ())]
    assert frames >= 15 and found[("moshi_output_level_dbfs_count", ())] == frames
    # The caller's -20 dBFS tone: most frames land in the (-30, -10] dBFS buckets.
    level = found[("moshi_input_level_dbfs_bucket", (("le", "-10.0"),))] - found[
        ("moshi_input_level_dbfs_bucket", (("le", "-30.0"),))]
    assert level >= frames * 0.8
    delay_p50_bucket = found[("moshi_mouth_to_ear_estimate_seconds_bucket", (("le", "0.4"),))]
    assert delay_p50_bucket >= frames / 2  # the server's share stays well under 0.4 s on loopback
    assert found[("moshi_input_frames_dropped_total", ())] == 0
    assert found[("moshi_engine_ready", ())] == 1 and found[("moshi_call_slots_free", ())] == 2


async def test_the_api_token_guards_the_call_api_and_leaves_health_open():
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1), SignalingConfig(api_token="s3cret"))
    async with aiohttp.ClientSession() as http:
        for method, path in (("GET", "/ice-servers"), ("GET", "/personas"), ("POST", "/offer"),
                             ("GET", "/sessions/x"), ("DELETE", "/sessions/x"), ("POST", "/whip"),
                             ("OPTIONS", "/whip")):
            async with http.request(method, server.url + path) as response:
                assert response.status == 401, path
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.get(server.url + "/ice-servers", headers={"Authorization": "Bearer wrong"}) as response:
            assert response.status == 401
        for path in ("/healthz", "/readyz", "/metrics", "/status", "/"):
            async with http.get(server.url + path) as response:
                assert response.status == 200, path
        async with http.get(server.url + "/status") as response:
            assert (await response.json())["auth"] is True  # the page can say a token is needed
    with pytest.raises(CallRefused) as refused:
        await place_call(server.url, tone(440, 0.5), ice=None)
    assert refused.value.status == 401 and server.engine.free_slots == 1
    recording = await place_call(server.url, tone(440, 1.0), tail_s=0.3, token="s3cret")
    assert np.abs(recording.audio).max() > 0.05
    await stop_server(server)


async def test_only_allowed_origins_may_call_across_origins():
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1),
                                SignalingConfig(cors_origins=("https://app.example.org",)))
    good, evil = {"Origin": "https://app.example.org"}, {"Origin": "https://evil.example.net"}
    async with aiohttp.ClientSession() as http:
        preflight = {**good, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type"}
        async with http.options(server.url + "/offer", headers=preflight) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.org"
            assert "POST" in response.headers["Access-Control-Allow-Methods"]
        async with http.post(server.url + "/offer", data=b"{}", headers={**good, **JSON}) as r:
            assert r.status == 400 and r.headers["Access-Control-Allow-Origin"] == "https://app.example.org"
        async with http.post(server.url + "/offer", data=b"{}", headers={**evil, **JSON}) as r:
            assert r.status == 403 and "evil.example.net is not allowed" in (await r.json())["error"]
            assert "Access-Control-Allow-Origin" not in r.headers
        async with http.get(server.url + "/ice-servers", headers=evil) as response:
            assert "Access-Control-Allow-Origin" not in response.headers  # the browser keeps it from that page
        same = {"Origin": server.url}
        async with http.post(server.url + "/offer", data=b"{}", headers={**same, **JSON}) as r:
            assert r.status == 400  # the server's own page is never blocked
    await stop_server(server)


async def test_offers_per_client_per_minute_are_limited_with_retry_after():
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1),
                                SignalingConfig(max_offers_per_minute=3, trust_forwarded_for=True))
    async with aiohttp.ClientSession() as http:
        statuses = []
        for i in range(4):  # what a client writes before its proxy's entry cannot dodge the limit
            async with http.post(server.url + "/offer", data=b"{}", headers={"Content-Type": "application/json",
                                 "X-Forwarded-For": f"10.0.0.{i}, 203.0.113.7"}) as response:
                statuses.append(response.status)
                retry = response.headers.get("Retry-After")
                body = await response.json()
        assert statuses == [400, 400, 400, 429]
        assert 1 <= int(retry) <= 61 and "at most 3 a minute" in body["error"]
        async with http.post(server.url + "/whip", data=b"v=0", headers={"Content-Type": "application/sdp",
                             "X-Forwarded-For": "203.0.113.7"}) as response:
            assert response.status == 429  # WHIP offers count too
        async with http.post(server.url + "/offer", data=b"{}", headers={"Content-Type": "application/json",
                             "X-Forwarded-For": "198.51.100.1"}) as response:
            assert response.status == 400  # another client is not held back
    await stop_server(server)


def test_the_rate_window_slides():
    now = {"t": 1000.0}
    limit = OfferRateLimit(2, clock=lambda: now["t"])
    assert limit.retry_after("a") is None and limit.retry_after("a") is None
    assert limit.retry_after("a") == 61
    now["t"] += 30
    assert limit.retry_after("a") == 31
    now["t"] += 30
    assert limit.retry_after("a") is None  # the first offer left the window


async def test_a_call_ends_at_its_maximum_length_with_a_bye_that_says_so(echo_server):
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1), SignalingConfig(max_call_s=1.0))
    started = time.monotonic()
    recording = await place_call(server.url, tone(440, 4.0), tail_s=0)
    byes = [e for e in recording.events if e["type"] == "bye"]
    assert byes and byes[0]["reason"] == "the call reached its maximum length of 1 s"
    assert len(recording.audio) / 24000 < 2.0 and time.monotonic() - started >= 1.0
    found = samples(server.service.metrics.render().decode())
    assert found[("moshi_calls_ended_total", (("reason", "max_duration"),))] == 1
    assert not server.service.sessions and server.engine.free_slots == 1
    await stop_server(server)


async def test_a_caller_who_vanishes_is_noticed_within_the_media_timeout(tmp_path, caplog):
    """The caller's process is killed mid-call: no DTLS close, no DELETE, its packets just stop. The server
    notices at the media timeout that it went away, and ends the call when the resume window (counted from
    its last packet, here shorter than the timeout) has passed without it."""
    server = await start_server(create_engine(ModelSource("echo"), max_calls=1),
                                SignalingConfig(media_timeout_s=1.5, resume_window_s=1.0))
    write_wav(tmp_path / "long.wav", tone(300, 30.0), 48000)
    caller = subprocess.Popen(
        [str(BIN), "call", str(tmp_path / "long.wav"), "--out", str(tmp_path / "out.wav"), "--url", server.url,
         "--ice-host-address", "127.0.0.1"], env=dict(os.environ, NO_TORCH_COMPILE="1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        while not server.service.sessions or next(iter(server.service.sessions.values())).call.stats.frames_in < 10:
            await asyncio.sleep(0.05)
        session = next(iter(server.service.sessions.values()))
        caller.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.wait_for(session.ended.wait(), 10)
        noticed = time.monotonic() - killed
    finally:
        caller.kill()
        caller.wait()
    reason = ("the caller went away (no audio from the caller for 1.5 s) and did not come back within the 1 s "
              "resume window")
    assert session.end_reason == reason and session.end_kind == "resume_expired"
    assert noticed > 1.4  # the media timeout ended it (its reason above), not aiortc's ~30 s consent expiry
    assert server.engine.free_slots == 1 and not server.service.sessions
    # Said at WARNING with the session's id, counted by kind, and still readable after the end.
    assert any(r.levelname == "WARNING" and session.session_id in r.getMessage() and session.end_reason
               in r.getMessage() for r in caplog.records)
    found = samples(server.service.metrics.render().decode())
    assert found[("moshi_calls_ended_total", (("reason", "resume_expired"),))] == 1
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/sessions/{session.session_id}") as response:
        summary = await response.json()
    assert response.status == 200 and summary["ended"] is True and summary["end_kind"] == "resume_expired"
    assert summary["end_reason"] == reason and summary["frames_in"] >= 10
    await stop_server(server)


async def test_the_dashboard_plots_only_metrics_the_server_exports(echo_server):
    import json
    import re

    dashboard = json.loads((Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json").read_text())
    plotted = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"moshi_[a-z_]+", target["expr"])}
    await place_call(echo_server.url, tone(440, 0.5), tail_s=0.2)  # so the labelled series exist
    async with aiohttp.ClientSession() as http, http.post(f"{echo_server.url}/offer", data=b"{}", headers=JSON):
        pass
    exported = set(samples(echo_server.service.metrics.render().decode()).keys())
    names = {name for name, _ in exported}
    assert len(plotted) >= 10
    assert plotted <= names, plotted - names
