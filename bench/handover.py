"""Network changes, before and after: the audio gap a caller hears when its path changes or drops out.

    .venv/bin/python bench/handover.py --checkout /tmp/base-551cd0f --checkout . [--runs 3]
        [--scenarios rebind,outage-3,...] [--out /tmp/handover.jsonl]

Every run of every scenario starts the checkout's server fresh (bench/abuse.py's Server: its own process,
cwd and PYTHONPATH the checkout, this repository's .venv Python, the echo model), with

    --max-calls-per-client 0 --max-offers-per-minute 0 --media-timeout 10 --resume-window 30 --log-level INFO

(--max-calls 1 for `resume`; only flags the checkout's `serve --help` names are passed). Checkouts alternate
run by run. The caller is aiortc in this process: a continuous -20 dBFS tone, which the echo engine sends back,
through a UdpRelay (tests/net_relay.py) between caller and server. The caller notes the arrival time of every
20 ms frame it receives whose RMS is above 0.01 (-40 dBFS): "voiced". The gap is the longest stretch without a
voiced frame from the last one before the event to the end of the observation window (a call whose audio never
comes back: the whole stretch, marked censored, ">="). Scenarios (issue 23's table):

    rebind      relay.rebind() 3 s into the tone: the server-facing port moves, the old one is closed (a NAT
                rebinding, a phone's Wi-Fi gone); the caller never renominates. Window 40 s.
    outage-N    relay.cut(), N s, relay.restore(): every datagram dropped both ways (N = 3, 8, 15). Window N + 25 s.
    page-rebind, page-move
                Chromium on the checkout's own page (bench/handover_page.py): the relay's server-facing port
                moves (a NAT rebinding), or its caller-facing port (Wi-Fi to cellular: the new path is named
                only in the answer to the page's next offer, an ICE restart or a resume). Windows 20 and 40 s.
    resume      --max-calls 1; the caller's relay is cut for good, its peer connection abandoned (never closed:
                aiortc would send a DTLS close); 3 s later a NEW peer connection (through a new relay) offers with
                "resume": {session_id, token} where the first answer had a resume_token, else a plain offer,
                again every 1 s while the answer is 503, for up to 20 s. Window 30 s.

Per run: the gap, whether the call survived (GET /sessions/{id}: not ended; for resume the same session id),
the server's end_kind and when it ended, its path_switches / ice_restarts / resumes and moves [{kind, gap_s}],
and the server's log lines about the call. One JSON line per run (also appended to --out), then a markdown table
of medians per scenario and checkout, with the ratio last/first checkout of the median gaps.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/net_relay.py
sys.path.insert(0, str(ROOT / "bench"))  # bench/abuse.py's server and client helpers

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
from abuse import (  # noqa: E402
    LEGIT,
    Server,
    chosen,
    close_all,
    get_session,
    http_from,
    run_on_server,
    side_by_side,
    supported,
    tone,
)
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription  # noqa: E402
from handover_page import page_call  # noqa: E402
from net_relay import UdpRelay  # noqa: E402

from server.caller import record_track  # noqa: E402
from server.media.audio_out import OutboundAudioTrack  # noqa: E402
from server.media.ice import IceConfig  # noqa: E402

VOICED_RMS = 0.01  # -40 dBFS; the tone comes back at about 0.1 (-20 dBFS)
LEAD_S = 3.0  # voiced audio this long before the event
TONE_S = 120.0  # more than any run needs
RUN_LIMIT_S = 150.0  # a safety net around one run
RESUME_AFTER_S = 3.0
RETRY_FOR_S = 20.0
LOG_LINES_KEPT = 12


# -- the caller --------------------------------------------------------------------------------------------------


@dataclass
class Leg:
    """One peer connection of the caller, through its own relay."""

    pc: RTCPeerConnection
    relay: UdpRelay
    voiced: list[float]  # arrival times (time.monotonic()) of voiced frames
    session_id: str = ""
    answer: dict = field(default_factory=dict)
    states: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, connection state)
    events: list[dict] = field(default_factory=list)  # what the server said on `events` (bye, error, ...)
    readers: list[asyncio.Task] = field(default_factory=list)


async def voiced_frames(track: MediaStreamTrack, voiced: list[float]) -> None:
    """Note the arrival time of every voiced 20 ms frame of `track` (server.caller.record_track's chunks)."""
    chunks: list[np.ndarray] = []
    arrivals: list[float] = []
    task = asyncio.ensure_future(record_track(track, chunks, arrivals))
    try:
        while not task.done():
            await asyncio.sleep(0.02)
            for chunk, at in zip(chunks, arrivals, strict=True):
                if float(np.sqrt(np.mean(np.square(chunk)))) > VOICED_RMS:
                    voiced.append(at)
            chunks.clear()
            arrivals.clear()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def open_leg(voiced: list[float]) -> tuple[Leg, str]:
    """A new peer connection sending the tone, its relay started: (the leg, the offer through the relay)."""
    relay = await UdpRelay().start()
    pc = RTCPeerConnection(IceConfig().rtc_configuration("caller"))
    leg = Leg(pc, relay, voiced)
    voice = OutboundAudioTrack(sample_rate=48000, max_buffer_ms=int(1000 * (TONE_S + 10)))
    voice.push(tone(TONE_S))
    pc.addTrack(voice)
    channel = pc.createDataChannel("events")
    channel.on("message", lambda message: leg.events.append(json.loads(message)) if isinstance(message, str) else None)
    pc.on("connectionstatechange", lambda: leg.states.append((time.monotonic(), pc.connectionState)))
    pc.on("track", lambda track: leg.readers.append(asyncio.ensure_future(voiced_frames(track, voiced)))
          if track.kind == "audio" else None)
    await pc.setLocalDescription(await pc.createOffer())
    return leg, relay.offer(pc.localDescription.sdp)


async def post(http: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, dict]:
    async with http.post(f"{url}/offer", json=body) as response:
        text = await response.text()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = {"text": text[:200]}
        return response.status, parsed if isinstance(parsed, dict) else {"json": parsed}


async def connect_leg(leg: Leg, answer: dict, timeout_s: float = 15.0) -> None:
    leg.answer, leg.session_id = answer, answer["session_id"]
    await leg.pc.setRemoteDescription(RTCSessionDescription(sdp=leg.relay.answer(answer["sdp"]), type="answer"))
    deadline = time.monotonic() + timeout_s
    while leg.pc.connectionState != "connected":
        if time.monotonic() > deadline or leg.pc.connectionState in ("failed", "closed"):
            raise RuntimeError(f"the caller did not connect ({leg.pc.connectionState})")
        await asyncio.sleep(0.05)


async def wait_voiced(voiced: list[float], seconds: float, timeout_s: float = 20.0) -> None:
    """Until voiced audio has come back for `seconds`."""
    deadline = time.monotonic() + timeout_s
    while not voiced or voiced[-1] - voiced[0] < seconds:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no voiced audio for {seconds} s within {timeout_s} s ({len(voiced)} voiced frames)")
        await asyncio.sleep(0.05)


async def close_legs(legs: list[Leg]) -> None:
    for leg in legs:
        for reader in leg.readers:
            reader.cancel()
    for leg in legs:
        leg.relay.close()  # first: a closing pc's DTLS close goes nowhere, as on a dead path
    await close_all([leg.pc for leg in legs])


# -- figures -----------------------------------------------------------------------------------------------------


def longest_gap(voiced: list[float], event_at: float, window_end: float) -> tuple[float, bool, float | None]:
    """(the longest stretch without voiced audio from the last voiced frame at or before `event_at` to
    `window_end`, whether that stretch runs to the window's end (audio not back: a lower bound), the first
    voiced arrival more than 0.1 s after the event relative to the event)."""
    anchor = max((t for t in voiced if t <= event_at), default=event_at)
    after = sorted(t for t in voiced if event_at < t <= window_end)
    points = [anchor, *after, window_end]
    gaps = [b - a for a, b in zip(points, points[1:], strict=False)]
    longest = max(gaps)
    censored = gaps[-1] == longest and longest > 1.0
    back = next((t - event_at for t in after if t - anchor > 0.1 and t > event_at + 0.1), None)
    return round(longest, 3), censored, None if back is None else round(back, 3)


def server_view(summary: dict) -> dict:
    """What the server says about the call."""
    keys = ("ended", "end_kind", "end_reason", "slot", "connection", "path_switches", "ice_restarts", "resumes",
            "moves", "status")
    return {k: summary[k] for k in keys if k in summary}


def log_lines(server: Server, *session_ids: str) -> list[str]:
    wanted = [s for s in session_ids if s]
    lines = [line.strip()[:240] for line in server.lines if any(s in line for s in wanted)]
    return lines[-LOG_LINES_KEPT:]


async def watch(http: aiohttp.ClientSession, url: str, session_id: str, event_at: float, until: float,
                stop_when_ended: bool = True) -> tuple[dict, float | None]:
    """Poll GET /sessions/{id} once a second until monotonic `until` (or the call ends): (the last summary,
    seconds after the event at which it was first seen ended)."""
    summary: dict = {}
    ended_after = None
    while time.monotonic() < until:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            summary = await get_session(http, url, session_id)
        if ended_after is None and (summary.get("ended") or summary.get("status") == 404):
            ended_after = round(time.monotonic() - event_at, 1)
            if stop_when_ended:
                break
        await asyncio.sleep(max(0.0, min(1.0, until - time.monotonic())))
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        summary = await get_session(http, url, session_id)
    return summary, ended_after


# -- scenarios ---------------------------------------------------------------------------------------------------


@dataclass
class Scenario:
    window_s: float
    cut_s: float | None = None  # an outage of this long; None: a rebind, or (resume) a cut for good
    resume: bool = False
    flags: tuple[str, ...] = ()
    page: str | None = None  # Chromium on the page (bench/handover_page.py): "rebind" or "move"


SCENARIOS: dict[str, Scenario] = {
    "rebind": Scenario(window_s=40.0),
    "outage-3": Scenario(window_s=28.0, cut_s=3.0),
    "outage-8": Scenario(window_s=33.0, cut_s=8.0),
    "outage-15": Scenario(window_s=40.0, cut_s=15.0),
    "resume": Scenario(window_s=30.0, resume=True, flags=("--max-calls", "1")),
    "page-rebind": Scenario(window_s=20.0, page="rebind"),
    "page-move": Scenario(window_s=40.0, page="move"),
}
COMMON_FLAGS = ("--max-calls-per-client", "0", "--max-offers-per-minute", "0", "--media-timeout", "10",
                "--resume-window", "30", "--log-level", "INFO")


async def call(http: aiohttp.ClientSession, server: Server, leg: Leg, offer: str, voiced: list[float]) -> dict:
    """Place the leg's call and wait until its echo is heard: the answer, or {"error": ...} if refused."""
    status, answer = await post(http, server.url, {"sdp": offer, "type": "offer"})
    if status != 200:
        return {"error": f"offer answered {status}: {answer}"}
    await connect_leg(leg, answer)
    await wait_voiced(voiced, LEAD_S)
    return answer


async def same_path(server: Server, name: str, scenario: Scenario) -> dict:
    """rebind and outage-N: one peer connection throughout."""
    voiced: list[float] = []
    leg, offer = await open_leg(voiced)
    try:
        async with http_from(LEGIT) as http:
            if "error" in (answer := await call(http, server, leg, offer, voiced)):
                return answer
            event_at = time.monotonic()
            if scenario.cut_s is None:
                await leg.relay.rebind()
            else:
                leg.relay.cut()
            window_end = event_at + scenario.window_s
            if scenario.cut_s is not None:
                summary, ended_after = await watch(http, server.url, leg.session_id, event_at,
                                                   event_at + scenario.cut_s)
                leg.relay.restore()
                if ended_after is None:
                    summary, ended_after = await watch(http, server.url, leg.session_id, event_at, window_end)
            else:
                summary, ended_after = await watch(http, server.url, leg.session_id, event_at, window_end)
            if ended_after is not None:  # an ended call's audio does not come back: no need to wait it out
                await asyncio.sleep(1.0)
            gap, censored, back = longest_gap(voiced, event_at, min(time.monotonic(), window_end)
                                              if ended_after is None else window_end)
    finally:
        await close_legs([leg])
    states = [(round(t - event_at, 1), s) for t, s in leg.states if t >= event_at]
    return {"gap_s": gap, "gap_censored": censored, "audio_back_after_s": back,
            "survived": not summary.get("ended") and summary.get("status") is None,
            "ended_after_s": ended_after, **server_view(summary), "caller_states": states,
            "caller_events": [e.get("type") + (f": {e.get('reason')}" if e.get("reason") else "")
                              for e in leg.events if e.get("type") in ("bye", "error")],
            "relay": {"rebinds": leg.relay.rebinds, "dropped_by_cut": leg.relay.datagrams_after_cut},
            "log": log_lines(server, leg.session_id)}


async def resume(server: Server, name: str, scenario: Scenario) -> dict:
    """The first connection cut for good and abandoned; a new one 3 s later, resuming where it can."""
    voiced: list[float] = []
    first, offer = await open_leg(voiced)
    legs = [first]
    statuses: collections.Counter[str] = collections.Counter()
    try:
        async with http_from(LEGIT) as http:
            if "error" in (answer := await call(http, server, first, offer, voiced)):
                return answer
            before = await get_session(http, server.url, first.session_id)
            event_at = time.monotonic()
            window_end = event_at + scenario.window_s
            first.relay.cut()  # for good; first.pc is left as it is
            await asyncio.sleep(RESUME_AFTER_S)
            token = answer.get("resume_token")
            second: Leg | None = None
            tries_until = time.monotonic() + RETRY_FOR_S
            while True:
                tried_at = time.monotonic()
                leg, offer = await open_leg(voiced)
                legs.append(leg)
                body: dict = {"sdp": offer, "type": "offer"}
                if token:
                    body["resume"] = {"session_id": first.session_id, "token": token}
                try:
                    status, reply = await post(http, server.url, body)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    status, reply = type(exc).__name__, {}
                statuses[str(status)] += 1
                if status == 200:
                    second = leg
                    break
                if status != 503 or tried_at + 1.0 > tries_until:
                    break
                await asyncio.sleep(max(0.0, tried_at + 1.0 - time.monotonic()))  # a try a second, each a fresh pc
            offered_after = round(time.monotonic() - event_at, 2)
            if second is not None:
                with contextlib.suppress(RuntimeError):
                    await connect_leg(second, reply)
            while time.monotonic() < window_end:  # audio on the new connection
                if second is not None and voiced and voiced[-1] > event_at + RESUME_AFTER_S + 2.0:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(min(2.0, max(0.0, window_end - time.monotonic())))  # and that it keeps flowing
            first_summary = await get_session(http, server.url, first.session_id)
            second_summary = (await get_session(http, server.url, second.session_id)
                              if second is not None and second.session_id else {})
            gap, censored, back = longest_gap(voiced, event_at, min(time.monotonic(), window_end))
    finally:
        await close_legs(legs)
    same = second is not None and second.session_id == first.session_id
    return {"gap_s": gap, "gap_censored": censored, "audio_back_after_s": back,
            "survived": same and not second_summary.get("ended"), "same_session": same,
            "offers": dict(statuses), "busy_503": statuses.get("503", 0), "new_offer_answered_after_s": offered_after,
            "audio_back_after_new_path_s": None if back is None or second is None else round(back - offered_after, 3),
            "resumed_flag": bool(second and second.answer.get("resumed")),
            "slot_before": before.get("slot"), "slot_after": second_summary.get("slot"),
            "first_call": server_view(first_summary),
            "second_call": "same" if same else server_view(second_summary),
            **(server_view(second_summary) if same else {}),
            "caller_states": [s for _, s in (second.states if second else [])],
            "log": log_lines(server, first.session_id, second.session_id if second else "")}


# -- running -----------------------------------------------------------------------------------------------------


def measure(checkout: Path, label: str, name: str, run: int, help_text: str) -> dict:
    scenario = SCENARIOS[name]
    result: dict = {"scenario": name, "checkout": label, "path": str(checkout), "run": run}
    flags, dropped = supported(COMMON_FLAGS + scenario.flags, help_text)
    if dropped:
        result["flags_not_supported"] = dropped

    def start() -> Server:
        server = Server(checkout, flags)
        server.lines = collections.deque(maxlen=5000)
        server.start()
        return server

    if scenario.page is not None:
        return run_on_server(result, start, lambda server: page_call(server, name, scenario, longest_gap),
                             RUN_LIMIT_S)
    play = resume if scenario.resume else same_path
    return run_on_server(result, start, lambda server: play(server, name, scenario), RUN_LIMIT_S)


def median(values: list) -> float | None:
    values = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return round(statistics.median(values), 2) if values else None


def cell(results: list[dict]) -> dict:
    """The medians (and tallies) of one scenario's runs against one checkout."""
    figures = [r["figures"] for r in results if "error" not in r["figures"]]
    errors = len(results) - len(figures)
    gaps = [f["gap_s"] for f in figures]
    censored = sum(bool(f.get("gap_censored")) for f in figures)
    ends = collections.Counter(str(f.get("end_kind") or (f.get("first_call") or {}).get("end_kind"))
                               for f in figures if f.get("ended") or (f.get("first_call") or {}).get("ended"))
    moves = collections.Counter(m["kind"] for f in figures for m in f.get("moves") or [])
    return {
        "gap_s": median(gaps),
        "gaps": gaps,
        "censored": censored,
        "survived": f"{sum(bool(f.get('survived')) for f in figures)}/{len(figures)}",
        "ended_after_s": median([f.get("ended_after_s") for f in figures]),
        "end_kinds": dict(ends),
        "path_switches": median([f.get("path_switches") for f in figures]),
        "moves": dict(moves),
        "server_move_gap_s": median([m["gap_s"] for f in figures for m in f.get("moves") or []]),
        "busy_503": median([f.get("busy_503") for f in figures]),
        "after_new_path_s": median([f.get("audio_back_after_new_path_s") for f in figures]),
        "same_session": (f"{sum(bool(f.get('same_session')) for f in figures)}/{len(figures)}"
                         if any("same_session" in f for f in figures) else None),
        "errors": errors,
    }


def markdown(results: list[dict], labels: list[str]) -> str:
    by = collections.defaultdict(list)
    for r in results:
        by[(r["scenario"], r["checkout"])].append(r)
    lines = ["| scenario | checkout | gap s (median) | gaps s | audio back after the new path's answer s | survived | "
             "ended | server moves | 503s | after/before |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["scenario"] for r in results):
        cells = {label: cell(by[(name, label)]) for label in labels if by[(name, label)]}
        first, last = cells.get(labels[0]), cells.get(labels[-1])
        ratio = ""
        if len(labels) > 1 and first and last and first["gap_s"] and last["gap_s"] is not None:
            ratio = f"{last['gap_s'] / first['gap_s']:.3f}"
            if first["censored"]:
                ratio += " (before: lower bound)"
        for label, c in cells.items():
            gap = "" if c["gap_s"] is None else (">=" if c["censored"] * 2 > len(c["gaps"]) else "") + str(c["gap_s"])
            ended = ", ".join(f"{k} x{v}" for k, v in c["end_kinds"].items()) or "-"
            if c["ended_after_s"] is not None:
                ended += f" (at {c['ended_after_s']} s)"
            moves = ", ".join(f"{k} x{v}" for k, v in c["moves"].items()) or "-"
            if c["server_move_gap_s"] is not None:
                moves += f" (gap {c['server_move_gap_s']} s)"
            if c["path_switches"] is not None:
                moves += f"; path_switches {c['path_switches']}"
            survived = c["survived"] + (f", same session {c['same_session']}" if c["same_session"] else "")
            if c["errors"]:
                survived += f"; {c['errors']} errors"
            new_path = "" if c["after_new_path_s"] is None else c["after_new_path_s"]
            lines.append(f"| {name} | {label} | {gap} | {', '.join(map(str, c['gaps']))} | {new_path} | {survived} | "
                         f"{ended} | "
                         f"{moves} | {'' if c['busy_503'] is None else c['busy_503']} | "
                         f"{ratio if label == labels[-1] else ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, action="append", help="a server checkout (repeatable; the first "
                        "is 'before', the last 'after' in the ratio)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scenarios", help=f"comma-separated, of: {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--out", type=Path, help="append each run here as a JSON line")
    args = parser.parse_args()
    checkouts = [c.resolve() for c in args.checkout or [ROOT]]
    names = chosen(parser, args.scenarios, SCENARIOS, "scenarios")
    began = time.monotonic()
    runs = [(name, run) for name in names for run in range(1, args.runs + 1)]
    results, labels = side_by_side(checkouts, runs, lambda checkout, label, item, help_text: measure(
        checkout, label, *item, help_text), args.out)
    print(f"\n{markdown(results, [labels[c] for c in checkouts])}\n\n{len(results)} runs in "
          f"{time.monotonic() - began:.0f} s", flush=True)


if __name__ == "__main__":
    main()
