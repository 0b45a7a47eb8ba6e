#!/usr/bin/python3
"""A real GStreamer caller: webrtcbin, a second WebRTC stack independent of aiortc and Chromium.

Run it with Debian's /usr/bin/python3 (the interpreter that has `gi` and GStreamer's bindings), not
the project's virtual environment:

    /usr/bin/python3 tests/gst_caller.py http://127.0.0.1:8080 --signal whip --seconds 4 --wav out.wav

It places one call with webrtcbin: a sendrecv Opus transceiver sending audiotestsrc's sine (440 Hz at
-20 dBFS by default), GStreamer's own DTLS certificate (RSA 2048 in GStreamer 1.22), ICE host
candidates on 127.0.0.1 only, no STUN, everything bundled. The offer goes out once ICE gathering is
complete (no trickle), through `POST /offer` (JSON) or WHIP (`POST /whip`, application/sdp, 201 with a
Location that is DELETEd to hang up); `--setup passive` rewrites the offer's `a=setup:actpass` so that
the server must be the DTLS client of GStreamer's RSA certificate. Once the connection is up it records
the audio it receives for `--seconds`, hangs up, and prints one JSON object on stdout:

    {"connected": bool, "connection_state", "ice_connection_state", "dtls_state",
     "received_seconds", "level_dbfs", "frequency_hz", "signal", "session", "answer_setup", "error"}
    (and "hangup_error" when the hang-up request failed)

`level_dbfs` (RMS re full scale 1.0, as the project measures) and `frequency_hz` (from zero
crossings) are over the received tone's middle: samples above -34 dBFS peak, minus 0.1 s at each
edge. `--wav` writes everything received (48 kHz mono 16-bit) for a closer look. Exit status: 0 when
the call connected and audio came back, 1 otherwise (the JSON says why).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
import sys
import threading
import urllib.error
import urllib.request
import wave

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstSdp", "1.0")
gi.require_version("GstWebRTC", "1.0")
from gi.repository import GLib, Gst, GstSdp, GstWebRTC  # noqa: E402

RATE = 48000
VOICED = 0.02  # a sample above this (-34 dBFS) is part of the tone
EDGE = RATE // 10  # left out of the measurement at each end of the voiced span: codec onsets, fades


def tone_volume(dbfs: float) -> float:
    """audiotestsrc's `volume` is the sine's peak: RMS at `dbfs` needs a peak sqrt(2) times higher."""
    return 10 ** (dbfs / 20) * math.sqrt(2)


class HttpError(RuntimeError):
    pass


def http(method: str, url: str, body: bytes | None = None, content_type: str | None = None,
         token: str | None = None) -> tuple[int, dict, bytes]:
    headers = {"Content-Type": content_type} if content_type else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        raise HttpError(f"{method} {url}: {error.code} {error.read().decode(errors='replace')}") from None


def with_candidates(sdp: str, candidates: list[tuple[int, str]]) -> str:
    """The SDP with every gathered candidate in its media section and each section ended with
    a=end-of-candidates (webrtcbin 1.22's local description carries the candidates once gathering is
    complete, without the end marker; this does not depend on it)."""
    ending = "\r\n"
    lines = sdp.replace("\r\n", "\n").rstrip("\n").split("\n")
    sections: list[list[str]] = [[]]
    for line in lines:
        if line.startswith("m="):
            sections.append([])
        sections[-1].append(line)
    for index, section in enumerate(sections[1:]):
        present = {line for line in section if line.startswith("a=candidate:")}
        for mline, candidate in candidates:
            line = candidate if candidate.startswith("a=") else f"a={candidate}"
            if mline == index and line not in present:
                section.append(line)
        if not any(line == "a=end-of-candidates" for line in section):
            section.append("a=end-of-candidates")
    return ending.join(line for section in sections for line in section) + ending


class GstCaller:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.base = args.url.rstrip("/")
        self.loop = GLib.MainLoop()
        self.result: dict = {"connected": False, "connection_state": None, "ice_connection_state": None,
                             "dtls_state": None, "received_seconds": 0.0, "level_dbfs": None,
                             "frequency_hz": None, "signal": args.signal, "session": None, "error": None}
        self.candidates: list[tuple[int, str]] = []
        self.samples: list[float] = []
        self.samples_lock = threading.Lock()
        self.recording = False
        self.hangup_url: str | None = None
        self.pipeline = Gst.parse_launch(
            "webrtcbin name=webrtc bundle-policy=max-bundle "
            f"audiotestsrc is-live=true wave=sine freq={args.freq} volume={tone_volume(args.dbfs):.6f} "
            "! audio/x-raw,rate=48000,channels=1 ! audioconvert ! audioresample "
            "! opusenc bitrate=64000 ! rtpopuspay pt=111 "
            "! application/x-rtp,media=audio,encoding-name=OPUS,payload=111,clock-rate=48000 ! webrtc."
        )
        self.webrtc = self.pipeline.get_by_name("webrtc")
        # ICE on 127.0.0.1 only: libnice would otherwise gather on every interface but loopback.
        # Keep the agent's Python wrapper as long as the pipeline: with GStreamer 1.22, a dropped wrapper
        # frees the agent under webrtcbin (a crash at negotiation; docs/FACTS.md).
        self.ice_agent = agent = self.webrtc.get_property("ice-agent")
        if agent is not None and not agent.emit("add-local-ip-address", "127.0.0.1"):
            raise RuntimeError("webrtcbin's ICE agent refused 127.0.0.1 as its local address")
        self.webrtc.connect("on-negotiation-needed", self._on_negotiation_needed)
        self.webrtc.connect("on-ice-candidate", self._on_ice_candidate)
        self.webrtc.connect("notify::ice-gathering-state", self._on_gathering_state)
        self.webrtc.connect("notify::connection-state", self._on_connection_state)
        self.webrtc.connect("notify::ice-connection-state", self._on_ice_connection_state)
        self.webrtc.connect("pad-added", self._on_pad_added)
        bus = self.pipeline.get_bus()
        bus.add_signal_watch()
        bus.connect("message::error", self._on_bus_error)
        self.offer_sent = False
        self.finished = False
        self.dtls_transport = None

    # -- the call -----------------------------------------------------------------------------

    def run(self) -> dict:
        self.pipeline.set_state(Gst.State.PLAYING)
        transceiver = self.webrtc.emit("get-transceiver", 0)
        if transceiver is not None:
            transceiver.set_property("direction", GstWebRTC.WebRTCRTPTransceiverDirection.SENDRECV)
        GLib.timeout_add_seconds(self.args.connect_timeout, self._connect_timed_out)
        self.loop.run()
        self.finished = True
        self._hang_up()
        self.pipeline.set_state(Gst.State.NULL)
        self._measure()
        return self.result

    def fail(self, message: str) -> bool:
        if self.result["error"] is None and not self.finished:
            self.result["error"] = message
        self.loop.quit()
        return False  # as a GLib source: once

    def _connect_timed_out(self) -> bool:
        if not self.result["connected"]:
            self.fail(f"not connected after {self.args.connect_timeout} s "
                      f"(ICE {self.result['ice_connection_state']}, DTLS {self._dtls_state()})")
        return False

    def _on_bus_error(self, _bus, message) -> None:
        error, debug = message.parse_error()
        self.fail(f"GStreamer error from {message.src.get_name()}: {error.message} ({debug})")

    def _on_negotiation_needed(self, element) -> None:
        promise = Gst.Promise.new_with_change_func(self._on_offer_created, element, None)
        element.emit("create-offer", None, promise)

    def _on_offer_created(self, promise, element, _data) -> None:
        promise.wait()
        reply = promise.get_reply()
        offer = reply.get_value("offer") if reply is not None else None
        if offer is None:
            GLib.idle_add(self.fail, "webrtcbin could not create an offer")
            return
        element.emit("set-local-description", offer, Gst.Promise.new())

    def _on_ice_candidate(self, _element, mline: int, candidate: str) -> None:
        self.candidates.append((mline, candidate))

    def _on_gathering_state(self, element, _pspec) -> None:
        if element.get_property("ice-gathering-state") == GstWebRTC.WebRTCICEGatheringState.COMPLETE:
            GLib.idle_add(self._send_offer)

    def _send_offer(self) -> bool:
        if self.offer_sent:
            return False
        self.offer_sent = True
        local = self.webrtc.get_property("local-description")
        if local is None:
            self.fail("ICE gathering completed before webrtcbin had a local description")
            return False
        offer_sdp = with_candidates(local.sdp.as_text(), self.candidates)
        if self.args.setup != "actpass":  # webrtcbin itself offers actpass, and follows the answer's role
            offer_sdp = re.sub(r"^a=setup:actpass", f"a=setup:{self.args.setup}", offer_sdp, flags=re.MULTILINE)
        try:
            answer_sdp = self._signal(offer_sdp)
        except (HttpError, OSError, ValueError, KeyError) as error:
            self.fail(f"signaling failed: {error}")
            return False
        ok, sdp = GstSdp.SDPMessage.new_from_text(answer_sdp)
        if ok != GstSdp.SDPResult.OK:
            self.fail("the answer is not SDP that GStreamer parses")
            return False
        answer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, sdp)
        promise = Gst.Promise.new()
        self.webrtc.emit("set-remote-description", answer, promise)
        promise.wait()
        self._watch_dtls()
        self.result["answer_setup"] = re.findall(r"^a=setup:(\S+)", answer_sdp, re.MULTILINE)
        return False

    def _signal(self, offer_sdp: str) -> str:
        token = self.args.token
        if self.args.signal == "whip":
            status, headers, body = http("POST", f"{self.base}/whip", offer_sdp.encode(), "application/sdp", token)
            location = headers.get("Location")
            if status != 201 or not location:
                raise HttpError(f"POST /whip answered {status} without a Location")
            self.hangup_url = location if location.startswith("http") else f"{self.base}{location}"
            self.result["session"] = location
            return body.decode()
        body = json.dumps({"sdp": offer_sdp, "type": "offer"}).encode()
        _, _, reply = http("POST", f"{self.base}/offer", body, "application/json", token)
        answer = json.loads(reply)
        if answer.get("type") != "answer":
            raise ValueError(f"POST /offer did not answer with an answer: {answer}")
        self.result["session"] = answer["session_id"]
        self.hangup_url = f"{self.base}/sessions/{answer['session_id']}"
        return answer["sdp"]

    def _hang_up(self) -> None:
        if self.hangup_url is None:
            return
        try:
            http("DELETE", self.hangup_url, token=self.args.token)
        except (HttpError, OSError) as error:
            self.result["hangup_error"] = str(error)

    # -- states ---------------------------------------------------------------------------------
    # Connected means ICE connected and the DTLS handshake done (webrtcbin 1.22's connection-state can
    # say "connected" while DTLS is still at it). States that arrive after the call is over are ignored.

    def _dtls_transport(self):
        transceiver = self.webrtc.emit("get-transceiver", 0)
        receiver = transceiver.get_property("receiver") if transceiver is not None else None
        return receiver.get_property("transport") if receiver is not None else None

    def _dtls_state(self) -> str | None:
        transport = self._dtls_transport()
        if transport is None:
            return None
        state = transport.get_property("state").value_nick
        if not self.finished:
            self.result["dtls_state"] = state
        return state

    def _watch_dtls(self) -> None:
        transport = self._dtls_transport()
        if transport is None:
            self.fail("webrtcbin has no DTLS transport after the answer")
            return
        self.dtls_transport = transport  # kept, so that its wrapper and signal outlive this call
        transport.connect("notify::state", lambda *_: GLib.idle_add(self._check_states))

    def _on_ice_connection_state(self, *_args) -> None:
        GLib.idle_add(self._check_states)

    def _on_connection_state(self, *_args) -> None:
        GLib.idle_add(self._check_states)

    def _check_states(self) -> bool:
        if self.finished:
            return False
        ice = self.webrtc.get_property("ice-connection-state")
        self.result["ice_connection_state"] = ice.value_nick
        self.result["connection_state"] = self.webrtc.get_property("connection-state").value_nick
        dtls = self._dtls_state()
        ice_up = ice in (GstWebRTC.WebRTCICEConnectionState.CONNECTED, GstWebRTC.WebRTCICEConnectionState.COMPLETED)
        if ice_up and dtls == "connected" and not self.result["connected"]:
            self.result["connected"] = True
            self.recording = True
            GLib.timeout_add(int(1000 * self.args.seconds), self._done)
        elif ice == GstWebRTC.WebRTCICEConnectionState.FAILED:
            self.fail("ICE failed")
        elif dtls == "failed":
            self.fail("the DTLS handshake failed")
        return False

    def _done(self) -> bool:
        self._dtls_state()
        self.loop.quit()
        return False

    # -- what comes back ------------------------------------------------------------------------

    def _on_pad_added(self, _element, pad) -> None:
        if pad.get_direction() != Gst.PadDirection.SRC:
            return
        sink = Gst.parse_bin_from_description(
            "rtpopusdepay ! opusdec ! audioconvert ! audioresample "
            "! audio/x-raw,format=F32LE,rate=48000,channels=1,layout=interleaved "
            "! appsink name=recorder emit-signals=true sync=false",
            True,
        )
        self.pipeline.add(sink)
        sink.sync_state_with_parent()
        sink.get_by_name("recorder").connect("new-sample", self._on_sample)
        if pad.link(sink.get_static_pad("sink")) != Gst.PadLinkReturn.OK:
            GLib.idle_add(self.fail, "could not link webrtcbin's incoming audio to the recorder")

    def _on_sample(self, appsink) -> Gst.FlowReturn:
        sample = appsink.emit("pull-sample")
        buffer = sample.get_buffer()
        ok, info = buffer.map(Gst.MapFlags.READ)
        if ok:
            try:
                data = bytes(info.data)
            finally:
                buffer.unmap(info)
            if self.recording:
                with self.samples_lock:
                    self.samples.extend(struct.unpack(f"<{len(data) // 4}f", data))
        return Gst.FlowReturn.OK

    def _measure(self) -> None:
        with self.samples_lock:
            samples = list(self.samples)
        self.result["received_seconds"] = round(len(samples) / RATE, 3)
        if self.args.wav:
            with wave.open(self.args.wav, "wb") as out:
                out.setnchannels(1)
                out.setsampwidth(2)
                out.setframerate(RATE)
                out.writeframes(struct.pack(f"<{len(samples)}h",
                                            *(max(-32768, min(32767, round(s * 32768))) for s in samples)))
        voiced = [i for i, s in enumerate(samples) if abs(s) > VOICED]
        if not voiced or voiced[-1] - voiced[0] <= 2 * EDGE + RATE // 10:
            if self.result["error"] is None and self.result["connected"]:
                self.result["error"] = "no tone came back"
            return
        steady = samples[voiced[0] + EDGE : voiced[-1] - EDGE]
        rms = math.sqrt(sum(s * s for s in steady) / len(steady))
        self.result["level_dbfs"] = round(20 * math.log10(rms + 1e-12), 2)
        self.result["frequency_hz"] = round(zero_crossing_hz(steady), 1)


def zero_crossing_hz(samples: list[float]) -> float:
    """A pure tone's frequency from its rising zero crossings, interpolated between samples."""
    crossings = [i + samples[i] / (samples[i] - samples[i + 1])
                 for i in range(len(samples) - 1) if samples[i] < 0 <= samples[i + 1]]
    if len(crossings) < 2:
        return 0.0
    return (len(crossings) - 1) * RATE / (crossings[-1] - crossings[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--signal", choices=("offer", "whip"), default="offer")
    parser.add_argument("--seconds", type=float, default=4.0, help="how long to record once connected")
    parser.add_argument("--freq", type=float, default=440.0)
    parser.add_argument("--dbfs", type=float, default=-20.0, help="the tone's RMS level")
    parser.add_argument("--setup", choices=("actpass", "passive", "active"), default="actpass",
                        help="the DTLS role the offer asks for (webrtcbin's is actpass); passive: GStreamer is "
                             "the DTLS server, with its RSA certificate, and the server its client")
    parser.add_argument("--token", help="the server's API token")
    parser.add_argument("--wav", help="write what came back here")
    parser.add_argument("--connect-timeout", type=int, default=20, help="give up if not connected by then")
    args = parser.parse_args(argv)
    Gst.init(None)
    if Gst.ElementFactory.find("webrtcbin") is None:
        print(json.dumps({"connected": False, "error": "GStreamer has no webrtcbin (gstreamer1.0-plugins-bad)"}))
        return 1
    result = GstCaller(args).run()
    print(json.dumps(result))
    return 0 if result["connected"] and result["level_dbfs"] is not None and result["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
