"""A real Chromium as the caller in the network and speech benches: audio sent and heard in WebAudio.

The page plays a WAV (the network bench's tone bursts, or speech_wer's read
speech) into a MediaStreamDestination that is its microphone, and records what
comes back through an AudioWorklet. Both happen in one AudioContext, so the send
time (when the WAV starts playing) and the arrival time (when a sample is
rendered, after Chromium's NetEq jitter buffer) are on one clock: the difference
is the mouth-to-ear delay a person with zero-latency speakers and microphone
would hear. The WAV starts 0.3 s after the call connects and plays once, from
its first sample. A WebAudio track skips getUserMedia's audio processing (echo
cancellation, noise suppression, gain control): what is sent is the WAV through
Chromium's own Opus encoder (WebRTC's, with in-band FEC when the answer's fmtp
asks for it and its RTCP receiver reports show loss). A small proxy in front of
the server under test serves the page and rewrites the offer and answer so the
media crosses the impairment relay (tests/net_relay.py); RTCP is never impaired.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import shutil
import socket
import wave

import aiohttp
import numpy as np
from aiohttp import web
from net_relay import Rule, UdpRelay

from server.media.latency_probe import BurstPlan

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required",
    "--allow-loopback-in-peer-connection",
]
RATE = 48000

RECORDER_JS = """
class Recorder extends AudioWorkletProcessor {
  constructor() { super(); this.on = true; this.port.onmessage = () => { this.on = false; }; }
  process(inputs) {
    const input = inputs[0];
    if (this.on && input.length) this.port.postMessage({t: currentTime, samples: input[0].slice()});
    return this.on;
  }
}
registerProcessor("recorder", Recorder);
"""

PAGE_HTML = """<!doctype html><meta charset="utf-8"><title>network bench caller</title><audio id="sink"></audio>
<script>
window.placeCall = async (seconds) => {
  const ctx = new AudioContext({sampleRate: 48000});
  await ctx.audioWorklet.addModule("/recorder.js");
  const sound = await ctx.decodeAudioData(await (await fetch("/send.wav")).arrayBuffer());
  const mic = ctx.createMediaStreamDestination();
  mic.channelCount = 1;
  const pc = new RTCPeerConnection();
  pc.addTrack(mic.stream.getAudioTracks()[0], mic.stream);
  const remote = new Promise((resolve) => { pc.ontrack = (e) => resolve(new MediaStream([e.track])); });
  await pc.setLocalDescription();
  await new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    pc.onicegatheringstatechange = () => { if (pc.iceGatheringState === "complete") resolve(); };
  });
  const response = await fetch("/offer", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({sdp: pc.localDescription.sdp, type: "offer"})});
  const answer = await response.json();
  await pc.setRemoteDescription({sdp: answer.sdp, type: "answer"});
  const stream = await remote;
  const sink = document.getElementById("sink");  // Chromium feeds a remote track to WebAudio only when
  sink.srcObject = stream; sink.muted = true; await sink.play();  // a media element plays it too
  await new Promise((resolve) => {
    if (pc.connectionState === "connected") return resolve();
    pc.onconnectionstatechange = () => { if (pc.connectionState === "connected") resolve(); };
  });
  const recorder = new AudioWorkletNode(ctx, "recorder");
  const quiet = ctx.createGain(); quiet.gain.value = 0;
  ctx.createMediaStreamSource(stream).connect(recorder).connect(quiet).connect(ctx.destination);
  const blocks = [];
  recorder.port.onmessage = (e) => blocks.push(e.data);
  const player = ctx.createBufferSource();
  player.buffer = sound;
  player.connect(mic);
  const start = ctx.currentTime + 0.3;
  player.start(start);
  await new Promise((resolve) => setTimeout(resolve, 1000 * seconds));
  recorder.port.postMessage("stop");
  const stats = {};
  const report = await pc.getStats();
  report.forEach((s) => {
    if (s.type === "outbound-rtp" && s.kind === "audio") {
      stats.sent = s.packetsSent; stats.sent_bytes = s.bytesSent;
      const codec = report.get(s.codecId);
      if (codec) stats.send_codec = `${codec.mimeType} ${codec.sdpFmtpLine || ""}`.trim();
    }
    if (s.type === "remote-inbound-rtp" && s.kind === "audio") {  // the server's RTCP receiver reports
      stats.reported_lost = s.packetsLost; stats.reported_fraction_lost = s.fractionLost;
      stats.reports = s.roundTripTimeMeasurements;
    }
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      stats.concealed_samples = s.concealedSamples; stats.jitter_buffer_ms =
        s.jitterBufferEmittedCount ? 1000 * s.jitterBufferDelay / s.jitterBufferEmittedCount : null;
    }
  });
  pc.close(); await ctx.close();
  const total = blocks.reduce((n, b) => n + b.samples.length, 0);
  const all = new Float32Array(total);
  const times = [];
  let at = 0;
  for (const b of blocks) { all.set(b.samples, at); times.push([at, b.t]); at += b.samples.length; }
  const bytes = new Uint8Array(all.buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return {start, times, audio: btoa(binary), answer_session: answer.session_id || null, stats};
};
</script>"""


def wav_bytes(audio: np.ndarray, rate: int = RATE) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def opus_fmtp(sdp: str) -> str | None:
    """The `a=fmtp` parameters of the SDP's Opus payload type (None when it has none)."""
    rtpmap = re.search(r"^a=rtpmap:(\d+) opus/48000", sdp, re.IGNORECASE | re.MULTILINE)
    fmtp = rtpmap and re.search(rf"^a=fmtp:{rtpmap.group(1)} (.*?)\s*$", sdp, re.MULTILINE)
    return fmtp.group(1) if fmtp else None


class ChromiumCallProxy:
    """Serves the bench page and relays `/offer` to the server under test, through an impairment relay.
    `audio` (float32 mono at RATE) is what the page sends; the Opus fmtp of the offer and of the answer are
    kept (`fmtp`) to show what each side asked for."""

    def __init__(self, target_url: str, audio: np.ndarray):
        self.target_url, self.audio = target_url, audio
        self.relay: UdpRelay | None = None
        self.session_id: str | None = None
        self.fmtp: dict[str, str | None] = {}
        self.answered = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> ChromiumCallProxy:
        app = web.Application()
        sound = wav_bytes(self.audio)
        app.router.add_get("/", lambda _: web.Response(text=PAGE_HTML, content_type="text/html"))
        app.router.add_get("/recorder.js", lambda _: web.Response(text=RECORDER_JS,
                                                                  content_type="application/javascript"))
        app.router.add_get("/send.wav", lambda _: web.Response(body=sound, content_type="audio/wav"))
        app.router.add_post("/offer", self._offer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, listening).start()
        self.url = f"http://127.0.0.1:{listening.getsockname()[1]}"
        return self

    async def _offer(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.fmtp["offer"] = opus_fmtp(body["sdp"])
        body["sdp"] = self.relay.offer(body["sdp"])
        async with aiohttp.ClientSession() as http, http.post(f"{self.target_url}/offer", json=body) as response:
            answer = await response.json()
        self.session_id = answer.get("session_id")
        self.fmtp["answer"] = opus_fmtp(answer.get("sdp", ""))
        self.answered.set()
        answer["sdp"] = self.relay.answer(answer["sdp"])
        return web.json_response(answer)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def recorded_chunks(result: dict, chunk: int = 960) -> tuple[list[np.ndarray], list[float]]:
    """The page's recording cut into 20 ms chunks, each with the AudioContext time of its first sample."""
    audio = np.frombuffer(base64.b64decode(result["audio"]), np.float32)
    offsets = np.array([at for at, _ in result["times"]], np.int64)
    times = np.array([t for _, t in result["times"]], np.float64)
    chunks, arrivals = [], []
    for begin in range(0, audio.size - chunk + 1, chunk):
        block = int(np.searchsorted(offsets, begin, side="right")) - 1
        chunks.append(audio[begin : begin + chunk])
        arrivals.append(float(times[block] + (begin - offsets[block]) / RATE))
    return chunks, arrivals


async def _place(browser, target_url: str, up: Rule, down: Rule, seconds: float, audio: np.ndarray,
                 on_answer) -> tuple[dict, ChromiumCallProxy]:
    """One call from a fresh page that sends `audio` and records `seconds` of the reply."""
    proxy = await ChromiumCallProxy(target_url, audio).start()
    proxy.relay = await UdpRelay(up=up, down=down).start()
    page = await browser.new_page()
    try:
        await page.goto(proxy.url)
        task = asyncio.ensure_future(page.evaluate("(s) => window.placeCall(s)", seconds))
        answered = asyncio.ensure_future(proxy.answered.wait())
        await asyncio.wait({task, answered}, return_when=asyncio.FIRST_COMPLETED)
        answered.cancel()
        if proxy.session_id is not None:  # handed over while the call runs, so the bench can read its stats
            on_answer(proxy.session_id)
        result = await task
    finally:
        await page.close()
        await proxy.close()
        proxy.relay.close()
    return result, proxy


async def chromium_call(browser, target_url: str, up: Rule, down: Rule, seconds: float, plan: BurstPlan,
                        on_answer=lambda session_id: None) -> tuple[dict, UdpRelay]:
    """One call from a fresh page; returns the burst delays keyed by burst and the relay (for its counters)."""
    result, proxy = await _place(browser, target_url, up, down, seconds, plan.audio(RATE), on_answer)
    chunks, arrivals = recorded_chunks(result)
    return {"delays": plan.delays(chunks, arrivals, result["start"], rate=RATE), "stats": result["stats"]}, proxy.relay


async def chromium_recording(browser, target_url: str, up: Rule, down: Rule, audio: np.ndarray, seconds: float,
                             on_answer=lambda session_id: None) -> tuple[np.ndarray, dict, UdpRelay]:
    """One call that sends `audio` (float32 mono at RATE) once; returns what the page heard (float32 mono at
    RATE, from the moment the call connected, `seconds` long), the page's WebRTC figures with the offer's and
    the answer's Opus fmtp, and the relay (for its counters)."""
    result, proxy = await _place(browser, target_url, up, down, seconds, audio, on_answer)
    heard = np.frombuffer(base64.b64decode(result["audio"]), np.float32).copy()
    return heard, {**result["stats"], "fmtp": proxy.fmtp}, proxy.relay
