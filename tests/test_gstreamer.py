"""A real GStreamer webrtcbin caller (tests/gst_caller.py, run by Debian's /usr/bin/python3) calls the
echo server through `/offer` and through WHIP, with GStreamer's own DTLS certificate (RSA 2048 in 1.22):
it connects, and its 440 Hz tone at -20 dBFS comes back at that level and pitch.

webrtcbin is a WebRTC stack of its own (libnice, its own DTLS and SRTP, GStreamer's Opus), so this
proves the server against something other than aiortc and Chromium. Debian packages: see `./run test`.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from test_call_e2e import dbfs
from test_dtls_certificates import assert_echoed_tone

SYSTEM_PYTHON = "/usr/bin/python3"
CALLER = Path(__file__).with_name("gst_caller.py")
RECORD_SECONDS = 3.0


def _system_env() -> dict:
    """The environment for Debian's Python: nothing of this project's virtual environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.setdefault("GST_DEBUG", "1")  # errors only on stderr
    return env


def _why_no_gstreamer() -> str | None:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} is missing (Debian's Python carries GStreamer's gi bindings)"
    probe = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstWebRTC', '1.0'); "
             "gi.require_version('GstSdp', '1.0'); from gi.repository import Gst, GstWebRTC, GstSdp; Gst.init(None); "
             "missing = [e for e in ('webrtcbin', 'nicesrc', 'opusenc', 'opusdec', 'rtpopuspay', 'rtpopusdepay', "
             "'audiotestsrc', 'appsink') if Gst.ElementFactory.find(e) is None]; print(' '.join(missing))")
    try:
        done = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True, env=_system_env(),
                              timeout=120)
    except subprocess.TimeoutExpired:
        return "probing GStreamer through /usr/bin/python3 did not finish"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return (f"{SYSTEM_PYTHON} cannot import GStreamer's gi bindings ({last}); ./run test installs "
                "python3-gst-1.0, gir1.2-gst-plugins-bad-1.0 and GStreamer's plugins")
    if done.stdout.strip():
        return (f"GStreamer lacks the elements {done.stdout.strip()} (gstreamer1.0-plugins-bad, -nice, -good, "
                "-base; ./run test installs them)")
    return None


WHY_NO_GSTREAMER = _why_no_gstreamer() if sys.platform.startswith("linux") else "GStreamer tests run on Debian"
pytestmark = pytest.mark.skipif(WHY_NO_GSTREAMER is not None, reason=WHY_NO_GSTREAMER or "")


async def gst_call(url: str, tmp_path: Path, *args: str) -> tuple[dict, np.ndarray]:
    """Run the GStreamer caller against `url`; its JSON result and what it received (48 kHz mono)."""
    wav = tmp_path / "received.wav"
    process = await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON, str(CALLER), url, "--seconds", str(RECORD_SECONDS), "--wav", str(wav), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_system_env(),
    )
    out, err = await process.communicate()  # the caller bounds itself: --connect-timeout, then --seconds
    lines = out.decode().strip().splitlines()
    assert lines, f"the GStreamer caller printed nothing (exit {process.returncode}): {err.decode()[-3000:]}"
    result = json.loads(lines[-1])
    audio = np.zeros(0, dtype=np.float32)
    if wav.exists():
        with wave.open(str(wav)) as recorded:
            audio = np.frombuffer(recorded.readframes(recorded.getnframes()), dtype=np.int16) / 32768.0
    return result, audio


def assert_connected_and_echoed(result: dict, audio: np.ndarray) -> None:
    assert result["error"] is None and "hangup_error" not in result, result
    assert result["connected"] and result["dtls_state"] == "connected", result
    assert result["ice_connection_state"] in ("connected", "completed"), result
    assert_echoed_tone(audio.astype(np.float32), rate=48000)
    # The caller's own measurement (pure Python, zero crossings) agrees.
    assert result["level_dbfs"] == pytest.approx(-20.0, abs=2.0)
    assert result["frequency_hz"] == pytest.approx(440.0, abs=5.0)


@pytest.mark.parametrize("signal", ["offer", "whip"])
async def test_gstreamer_calls_through_offer_and_whip_and_hears_its_tone(echo_server, tmp_path, signal):
    """webrtcbin offers actpass with its RSA certificate; the server answers as the DTLS server."""
    result, audio = await gst_call(echo_server.url, tmp_path, "--signal", signal)
    assert result.get("answer_setup") == ["passive"], result
    assert_connected_and_echoed(result, audio)
    await wait_for_no_sessions(echo_server)


async def test_gstreamer_as_the_dtls_server_with_its_rsa_certificate(echo_server, tmp_path):
    """The offer asks for passive: webrtcbin is the DTLS server, and the server's DTLS client accepts the
    ECDHE-RSA suite its RSA certificate needs."""
    result, audio = await gst_call(echo_server.url, tmp_path, "--setup", "passive")
    assert result.get("answer_setup") == ["active"], result
    assert_connected_and_echoed(result, audio)


async def wait_for_no_sessions(server) -> None:
    """The caller hung up (WHIP DELETE of the Location, or DELETE /sessions/{id}): the session ends, and
    the service forgets it as it ends."""
    await asyncio.gather(*(session.ended.wait() for session in list(server.service.sessions.values())))
    assert not server.service.sessions and server.engine.free_slots == 2


def test_the_level_helper_agrees_with_the_callers_tone_volume():
    """audiotestsrc's volume is the sine's peak: the caller's -20 dBFS is RMS, as the project measures."""
    t = np.arange(48000) / 48000
    assert dbfs(10 ** (-20 / 20) * np.sqrt(2) * np.sin(2 * np.pi * 440 * t)) == pytest.approx(-20.0, abs=0.01)
