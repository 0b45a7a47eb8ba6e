"""Property-based tests (hypothesis): whatever a client sends, a 4xx or a call, never a 5xx or a crash;
whatever audio arrives, only finite samples in [-1, 1] reach the model or a listener.

Thousands of cases in all; the HTTP cases run against the real app on loopback with the echo engine.
"""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from attackers import aiortc_offer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.audio.inbound import InboundAudio
from server.engine import check_frame
from server.engine.setup import create_engine
from server.media.audio_out import OutboundAudioTrack
from server.model.source import ModelSource
from signaling.app import SignalingConfig
from signaling.offer_check import OfferRejected, check_offer_sdp, parse_offer_json

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


OFFER = asyncio.run(aiortc_offer())
LINES = OFFER.splitlines()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated_sdp(draw) -> str:
    """The valid offer with lines dropped, duplicated, cut or rewritten, or random text."""
    kind = draw(st.sampled_from(["drop", "duplicate", "cut", "rewrite", "garbage", "truncate"]))
    lines = list(LINES)
    index = draw(st.integers(0, len(lines) - 1))
    if kind == "drop":
        del lines[index]
    elif kind == "duplicate":
        lines.insert(index, lines[index])
    elif kind == "cut":
        lines[index] = lines[index][: draw(st.integers(0, len(lines[index])))]
    elif kind == "rewrite":
        line = lines[index]
        position = draw(st.integers(0, max(0, len(line) - 1)))
        lines[index] = line[:position] + draw(st.text(min_size=1, max_size=8)) + line[position + 1:]
    elif kind == "garbage":
        return draw(st.text(max_size=300))
    else:
        return OFFER[: draw(st.integers(0, len(OFFER)))]
    return "\r\n".join(lines) + "\r\n"


offer_bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["offer", "answer", "", 3]), "sdp": mutated_sdp() | json_values},
        optional={"persona": json_values},
    ).map(lambda v: json.dumps(v).encode()),
)


@settings(FUZZ, max_examples=2000)
@given(body=offer_bodies, content_type=st.sampled_from(["application/json", "text/plain", "", "application/sdp"]))
def test_parsing_an_offer_body_gives_an_offer_or_a_4xx(body, content_type):
    try:
        offer = parse_offer_json(body, content_type)
    except OfferRejected as rejected:
        assert 400 <= rejected.status < 500 and rejected.message
    else:
        assert offer.description.type == "offer" and offer.description.sdp.lstrip().startswith("v=0")


@settings(FUZZ, max_examples=2000)
@given(sdp=mutated_sdp())
def test_checking_a_whip_sdp_gives_ok_or_a_4xx(sdp):
    try:
        check_offer_sdp(sdp)
    except OfferRejected as rejected:
        assert 400 <= rejected.status < 500


@pytest.fixture(scope="module")
def http_server():
    """The real app on loopback (echo engine), on a loop of its own that sync hypothesis tests drive."""
    from conftest import start_server, stop_server

    from server.media.ice import use_host_addresses

    use_host_addresses(["127.0.0.1"])
    loop = asyncio.new_event_loop()
    config = SignalingConfig(media_timeout_s=2.0, max_offers_per_minute=0)
    server = loop.run_until_complete(start_server(create_engine(ModelSource("echo"), max_calls=4), config))
    http = loop.run_until_complete(_client())
    yield loop, server, http
    loop.run_until_complete(http.close())
    loop.run_until_complete(stop_server(server))
    loop.close()
    use_host_addresses(None)


async def _client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession()


async def _post(server, http, path: str, body: bytes, content_type: str) -> int:
    async with http.post(server.url + path, data=body, headers={"Content-Type": content_type}) as response:
        status = response.status
        await response.read()
        location = response.headers.get("Location")
        if status == 200:
            session_id = (json.loads(await response.read()))["session_id"]
            await server.service.sessions[session_id].hang_up("fuzz case done")
        elif status == 201 and location:
            await server.service.sessions[location.rsplit("/", 1)[1]].hang_up("fuzz case done")
    return status


@settings(FUZZ, max_examples=300)
@given(body=offer_bodies)
def test_the_offer_endpoint_never_answers_5xx(http_server, body):
    loop, server, http = http_server
    status = loop.run_until_complete(_post(server, http, "/offer", body, "application/json"))
    assert status < 500, (status, body[:200])
    assert server.engine.free_slots == 4 and not server.service.sessions


@settings(FUZZ, max_examples=300)
@given(sdp=mutated_sdp(), query=st.dictionaries(st.sampled_from(["prompt", "voice", "x"]), st.text(max_size=20)))
def test_the_whip_endpoint_never_answers_5xx(http_server, sdp, query):
    loop, server, http = http_server
    path = "/whip?" + "&".join(f"{k}={re.sub(r'[^A-Za-z0-9]', '', v)}" for k, v in query.items())
    status = loop.run_until_complete(_post(server, http, path, sdp.encode(errors="surrogatepass"), "application/sdp"))
    assert status < 500, (status, sdp[:200])
    assert server.engine.free_slots == 4 and not server.service.sessions


# -- the inbound and outbound audio paths -----------------------------------------------------------

FORMATS = {"s16": np.int16, "s16p": np.int16, "s32": np.int32, "flt": np.float32, "fltp": np.float32,
           "dbl": np.float64}
RATES = [8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 96000]

special = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1.0, -1.0, 1e6, -1e-30])


@st.composite
def audio_frames(draw) -> av.AudioFrame:
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    layout = draw(st.sampled_from(["mono", "stereo"]))
    rate = draw(st.sampled_from(RATES))
    count = draw(st.integers(1, 3000))
    channels = 1 if layout == "mono" else 2
    kind = draw(st.sampled_from(["silence", "quiet", "noise", "full_scale", "specials"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "silence":
        data = np.zeros((channels, count))
    elif kind == "quiet":  # -40 dBFS peaks: a scale slip (int16 values taken as floats) cannot hide in clipping
        data = rng.uniform(-0.01, 0.01, (channels, count))
    elif kind == "noise":
        data = rng.uniform(-0.5, 0.5, (channels, count))
    elif kind == "full_scale":
        data = rng.choice([-1.0, 1.0], (channels, count))
    else:
        data = rng.uniform(-1, 1, (channels, count))
        for _ in range(draw(st.integers(1, 5))):
            data[rng.integers(channels), rng.integers(count)] = draw(special)
    dtype = FORMATS[fmt]
    if np.issubdtype(dtype, np.integer):
        data = np.clip(np.nan_to_num(data, nan=0.0, posinf=1.0, neginf=-1.0), -1, 1) * np.iinfo(dtype).max
    data = data.astype(dtype)
    planar = fmt.endswith("p") or fmt == "fltp"
    array = data if planar else data.T.reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(array), format=fmt, layout=layout)
    frame.sample_rate = rate
    return frame


@settings(FUZZ, max_examples=1500)
@given(frames=st.lists(audio_frames(), min_size=1, max_size=6))
def test_any_inbound_audio_reaches_the_model_as_finite_frames_in_range(frames):
    """Finite, in range, and at the level it was sent: no output peak is more than twice the loudest input
    so far (resampling overshoots a little; int16 taken as float, seed 001's static, is 32767 times)."""
    inbound = InboundAudio(sample_rate=24000, frame_size=1920)
    loudest = 0.0
    for frame in frames:  # format, layout and rate may change from frame to frame
        loudest = max(loudest, full_scale_peak(frame))
        for out in inbound.push(frame):
            assert out.shape == (1920,) and out.dtype == np.float32
            assert np.isfinite(out).all() and np.abs(out).max() <= 1.0
            assert np.abs(out).max() <= 2 * loudest + 1e-6, (np.abs(out).max(), loudest)
            check_frame(out, 1920)  # what the engine itself requires, or it refuses the frame


def full_scale_peak(frame: av.AudioFrame) -> float:
    """A frame's peak as a fraction of full scale, whatever its sample format (infinite for inf or NaN)."""
    samples = frame.to_ndarray().astype(np.float64)
    dtype = FORMATS[frame.format.name]
    if np.issubdtype(dtype, np.integer):
        samples /= np.iinfo(dtype).max
    return float(np.max(np.abs(samples))) if np.isfinite(samples).all() else float("inf")


@settings(FUZZ, max_examples=500)
@given(audio=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=2000))
def test_no_nan_or_overflow_reaches_a_listener(audio):
    track = OutboundAudioTrack(sample_rate=24000, max_buffer_ms=2000)
    samples = np.array(audio, dtype=np.float32)
    track.push(samples)
    sent = np.concatenate(list(track._chunks))
    assert np.isfinite(sent).all() and np.abs(sent).max() <= 1.0
    bad = ~np.isfinite(samples)
    assert (sent[bad] == 0).all()  # NaN and infinities become silence, not a full-scale click


# -- trickled candidates (WHIP PATCH) ------------------------------------------------------------------

def _candidate_line(draw) -> str:
    field = st.text(alphabet=st.characters(blacklist_characters="\r\n"), max_size=12)
    parts = [
        draw(st.sampled_from(["1", "abc", "842163049"]) | field),
        draw(st.sampled_from(["1", "2", "3", "0"]) | field),
        draw(st.sampled_from(["udp", "tcp", "UDP", "sctp"]) | field),
        draw(st.sampled_from(["2130706431", "-1", "99999999999999999999"]) | field),
        draw(st.sampled_from(["127.0.0.1", "127.0.0.2", "::1", "999.1.1.1", "127.0.0"]) | field),
        draw(st.sampled_from(["40000", "0", "70000", "-5"]) | field),
        draw(st.sampled_from(["typ", "type"]) | field),
        draw(st.sampled_from(["host", "srflx", "relay", "prflx"]) | field),
    ]
    extra = draw(st.lists(st.sampled_from(["raddr", "0.0.0.0", "rport", "9", "generation", "0"]) | field,
                          max_size=4))
    return "a=candidate:" + " ".join(parts[: draw(st.integers(0, len(parts)))] if draw(st.booleans()) else
                                     parts + extra)


@st.composite
def sdp_fragments(draw, mid: str = "0") -> str:
    """trickle-ice-sdpfrag bodies: a=mid, a=candidate with fields right, wrong or missing, and noise."""
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["mid", "candidate", "candidate", "end", "noise"]))
        if kind == "mid":
            lines.append("a=mid:" + draw(st.sampled_from([mid, "9", ""]) | st.text(max_size=5)))
        elif kind == "candidate":
            lines.append(_candidate_line(draw))
        elif kind == "end":
            lines.append("a=end-of-candidates")
        else:
            lines.append(draw(st.text(max_size=40)))
    return "\r\n".join(lines) + "\r\n"


@settings(FUZZ, max_examples=2000)
@given(fragment=sdp_fragments())
def test_a_trickled_fragment_gives_checked_candidates_or_a_clear_refusal(fragment):
    from signaling.whip import MAX_PATCH_CANDIDATES, TrickleRejected, _trickled_candidates

    try:
        candidates = _trickled_candidates(fragment, {"0"})
    except TrickleRejected as rejected:
        assert str(rejected)
        return
    assert len(candidates) <= MAX_PATCH_CANDIDATES
    for candidate in candidates:
        assert candidate.sdpMid == "0" and 0 < candidate.port < 65536 and candidate.protocol.lower() in ("udp", "tcp")


@pytest.fixture(scope="module")
def whip_call(http_server):
    """One live WHIP call on the fuzz server, for PATCH cases (made after the cases that want no call)."""
    from aiortc import RTCSessionDescription

    loop, server, http = http_server

    async def start():
        pc = RTCPeerConnection()
        pc.addTrack(OutboundAudioTrack(sample_rate=48000))
        await pc.setLocalDescription(await pc.createOffer())
        async with http.post(server.url + "/whip", data=pc.localDescription.sdp,
                             headers={"Content-Type": "application/sdp"}) as response:
            assert response.status == 201
            location, answer = response.headers["Location"], await response.text()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        return pc, location

    pc, location = loop.run_until_complete(start())
    session = server.service.sessions[location.rsplit("/", 1)[1]]
    mid = re.search(r"^a=mid:(\S+)", session.remote_sdp, re.MULTILINE).group(1)
    yield server.url + location, mid
    loop.run_until_complete(session.hang_up("fuzz case done"))
    loop.run_until_complete(pc.close())


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_the_whip_patch_endpoint_never_answers_5xx(http_server, whip_call, data):
    loop, server, http = http_server
    url, mid = whip_call
    fragment = data.draw(sdp_fragments(mid=mid))

    async def patch() -> int:
        body = fragment.encode(errors="surrogatepass")  # a drawn lone surrogate goes out as invalid UTF-8
        async with http.patch(url, data=body, headers={"Content-Type": SDPFRAG_TYPE}) as response:
            await response.read()
            return response.status

    status = loop.run_until_complete(patch())
    assert status < 500, (status, fragment[:200])


SDPFRAG_TYPE = "application/trickle-ice-sdpfrag"
