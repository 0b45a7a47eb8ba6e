"""A short soak in the suite: calls ended every way leave no session, slot, peer, task, thread or fd.

`./run bench soak` runs the same for 500 calls and records memory growth (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import start_server, stop_server

from server.engine.setup import create_engine
from server.model.source import ModelSource
from signaling.app import SignalingConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import soak  # noqa: E402


async def test_calls_ended_every_way_leave_nothing_behind():
    config = SignalingConfig(media_timeout_s=1.0, resume_window_s=1.0, max_offers_per_minute=0,
                             max_calls_per_client=0)
    server = await start_server(create_engine(ModelSource("echo"), max_calls=4), config)
    await soak.soak(server.url, 8, 4)  # warm-up: first-use allocations are not leaks
    await soak.settle(server.service)
    before = soak.census(server.service)
    outcomes = await soak.soak(server.url, 24, 4)
    await soak.settle(server.service)
    after = soak.census(server.service)
    await stop_server(server)

    assert {k: v for k, v in outcomes.items() if k != "busy, retried"} == {e: 6 for e in soak.ENDINGS}
    ended = soak.ended_by_reason(server.service)
    assert ended["hung_up"] >= 6 and ended["caller_gone"] >= 6
    assert ended["resume_expired"] >= 6  # the quiet callers: connected, then no audio, and never back
    assert ended["ice_failed"] >= 6  # the callers gone before ICE connected: the timeout says it was ICE
    assert after["sessions"] == 0 and after["free_slots"] == 4
    for key in ("peer_connections", "fds", "threads", "tasks"):  # earlier tests may hold some of their own
        assert after[key] <= before[key], (key, before, after)
