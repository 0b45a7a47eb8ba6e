// One call to the server: microphone, RTCPeerConnection, the "events" data channel, stats.
import { apiFetch } from "./api.js";
// The server does not trickle ICE: we send a complete offer and get a complete answer.

// Echo cancellation stays on: the model must not hear itself. Automatic gain control and noise
// suppression are off: they reshape the caller's level and spectrum (a test measured +6.8 dB from AGC,
// -5.7 dB from noise suppression on a steady voiced sound), and the model hears best what it was
// trained on, the voice as spoken.
const MIC_CONSTRAINTS = {
  audio: { echoCancellation: true, noiseSuppression: false, autoGainControl: false, channelCount: 1 },
  video: false,
};

export class CallError extends Error {}

export function describeMicError(error) {
  if (!window.isSecureContext) return "The microphone needs a secure page: open it over https or on localhost.";
  switch (error && error.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "Microphone permission was denied. Allow the microphone for this site and call again.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No microphone was found. Plug one in or pick one in your system settings.";
    case "NotReadableError":
      return "The microphone is in use by another application, or the system blocked it.";
    default:
      return `The microphone could not be opened (${(error && error.name) || error}).`;
  }
}

// The server hands out its STUN/TURN servers (TURN with short-lived credentials of our own) and
// whether media must go through the relay.
async function iceConfig() {
  try {
    const response = await apiFetch("/ice-servers", { cache: "no-store" });
    if (response.ok) return await response.json();
  } catch (_) { /* no ICE configuration: host candidates only */ }
  return { iceServers: [], iceTransportPolicy: "all" };
}

function gatheringComplete(pc, timeoutMs = 3000) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { pc.removeEventListener("icegatheringstatechange", check); resolve(); };
    const check = () => { if (pc.iceGatheringState === "complete") done(); };
    pc.addEventListener("icegatheringstatechange", check);
    setTimeout(done, timeoutMs);
  });
}

export class Call extends EventTarget {
  constructor({ iceTransportPolicy = null, persona = null } = {}) {
    super();
    this.persona = persona; // {prompt, voice} for a model that takes one, else null
    this.iceTransportPolicy = iceTransportPolicy; // null: what the server asks for
    this.pc = null;
    this.mic = null;
    this.sessionId = null;
    this.sessionUrl = null; // where the call's own requests go: this origin, or its replica's public URL
    this.remoteStream = null;
    this.ended = false;
  }

  emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }

  async start() {
    try {
      this.mic = await navigator.mediaDevices.getUserMedia(MIC_CONSTRAINTS);
    } catch (error) {
      throw new CallError(describeMicError(error));
    }
    this.emit("mic", this.mic);
    const ice = await iceConfig();
    this.pc = new RTCPeerConnection({
      iceServers: ice.iceServers || [],
      iceTransportPolicy: this.iceTransportPolicy || ice.iceTransportPolicy || "all",
    });
    for (const track of this.mic.getAudioTracks()) this.pc.addTrack(track, this.mic);
    const events = this.pc.createDataChannel("events");
    events.onmessage = (message) => this.emit("event", JSON.parse(message.data));
    this.pc.ontrack = (event) => {
      this.remoteStream = event.streams[0] || new MediaStream([event.track]);
      this.emit("remote", this.remoteStream);
    };
    this.pc.onconnectionstatechange = () => {
      const state = this.pc.connectionState;
      this.emit("state", state);
      if (state === "failed") this.hangUp("the connection failed");
    };
    await this.pc.setLocalDescription(await this.pc.createOffer());
    await gatheringComplete(this.pc);
    if (this.pc.getConfiguration().iceTransportPolicy === "relay" && !this.pc.localDescription.sdp.includes(" typ relay")) {
      this.close();
      throw new CallError("No TURN relay could be reached: the relay server is down or refused our credentials.");
    }
    const response = await apiFetch("/offer", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        sdp: this.pc.localDescription.sdp,
        type: "offer",
        ...(this.persona ? { persona: this.persona } : {}),
      }),
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      this.close();
      if (response.status === 503 && body.error && body.error.includes("busy")) {
        const wait = response.headers.get("Retry-After") || "a few";
        throw new CallError(`The line is busy: every call slot is taken. Try again in ${wait} s.`);
      }
      throw new CallError(body.error || `The server refused the call (${response.status}).`);
    }
    this.sessionId = body.session_id;
    this.sessionUrl = body.session_url || `/sessions/${body.session_id}`;
    await this.pc.setRemoteDescription({ sdp: body.sdp, type: body.type });
  }

  async stats() {
    if (!this.pc) return null;
    const report = await this.pc.getStats();
    const out = { rttMs: null, jitterMs: null, lossPercent: null, audioEnergy: null };
    report.forEach((s) => {
      if (s.type === "candidate-pair" && s.nominated && s.currentRoundTripTime !== undefined) {
        out.rttMs = 1000 * s.currentRoundTripTime;
      }
      if (s.type === "inbound-rtp" && s.kind === "audio") {
        out.jitterMs = 1000 * (s.jitter || 0);
        const total = (s.packetsReceived || 0) + (s.packetsLost || 0);
        out.lossPercent = total ? (100 * (s.packetsLost || 0)) / total : 0;
        out.audioEnergy = s.totalAudioEnergy;
      }
    });
    return out;
  }

  close() {
    if (this.mic) this.mic.getTracks().forEach((t) => t.stop());
    if (this.pc) this.pc.close();
  }

  async hangUp(reason = "you hung up") {
    if (this.ended) return;
    this.ended = true;
    if (this.sessionId) {
      // Say goodbye before closing: a closed peer connection sends RTCP BYE at once, and the server
      // would count the call as a vanished caller. keepalive lets the request outlive a closing page;
      // a slow server does not hold the hang-up for more than a second.
      const goodbye = apiFetch(this.sessionUrl, { method: "DELETE", keepalive: true }).catch(() => {});
      await Promise.race([goodbye, new Promise((resolve) => setTimeout(resolve, 1000))]);
    }
    this.close();
    this.emit("ended", reason);
  }
}
