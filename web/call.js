// One call to the server: microphone, RTCPeerConnection, the "events" data channel, stats.
import { apiFetch } from "./api.js";
import { ReconnectError, Reconnector } from "./reconnect.js";
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

// Resolves once ICE gathering is complete for the current local description (at most `timeoutMs`): the
// gathering state says so, or the last candidate event (null) came. After an ICE restart the state may
// still read "complete" from the previous round: only a description that has candidates counts as gathered.
function gatheringComplete(pc, timeoutMs = 3000) {
  const gathered = () => pc.iceGatheringState === "complete" && /^a=candidate:/m.test(pc.localDescription.sdp);
  if (gathered()) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      pc.removeEventListener("icegatheringstatechange", onState);
      pc.removeEventListener("icecandidate", onCandidate);
      resolve();
    };
    const onState = () => { if (pc.iceGatheringState === "complete") done(); };
    const onCandidate = (event) => { if (event.candidate === null) done(); };
    pc.addEventListener("icegatheringstatechange", onState);
    pc.addEventListener("icecandidate", onCandidate);
    setTimeout(done, timeoutMs);
  });
}

async function postJson(url, body) {
  let response;
  try {
    response = await apiFetch(url, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
  } catch (error) {
    throw new ReconnectError(null, { error: `the server cannot be reached (${error.message || error})` });
  }
  return { response, body: await response.json().catch(() => ({})) };
}

export class Call extends EventTarget {
  constructor({ iceTransportPolicy = null, persona = null } = {}) {
    super();
    this.persona = persona; // {prompt, voice} for a model that takes one, else null
    this.iceTransportPolicy = iceTransportPolicy; // null: what the server asks for
    this.ice = null; // the server's /ice-servers answer
    this.pc = null; // the call's peer connection now (a resume replaces it)
    this.mic = null;
    this.sessionId = null;
    this.sessionUrl = null; // where the call's own requests go: this origin, or its replica's public URL
    this.resumeToken = null; // proves to the server that the call is ours, for an ICE restart or a resume
    this.resumeWindowS = 0; // how long the server keeps the call for us after the connection drops
    this.remoteStream = null;
    this.ended = false;
    this.reconnector = new Reconnector(this);
  }

  emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }

  get reconnectLog() { return this.reconnector.log; }

  // Reconnect now, as the page does by itself when the connection drops (for tests and debugging).
  restartIce() { return this.reconnector.restartIce(); }
  resume() { return this.reconnector.resume(); }

  async start() {
    try {
      this.mic = await navigator.mediaDevices.getUserMedia(MIC_CONSTRAINTS);
    } catch (error) {
      throw new CallError(describeMicError(error));
    }
    this.emit("mic", this.mic);
    this.ice = await iceConfig();
    this.pc = this.newPeer();
    const { response, body } = await this.offer(this.pc, "/offer", this.persona ? { persona: this.persona } : {});
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
    this.resumeToken = body.resume_token || null;
    this.resumeWindowS = body.resume_window_s || 0;
    await this.pc.setRemoteDescription({ sdp: body.sdp, type: body.type });
    this.reconnector.watchMedia();
  }

  // A peer connection with the microphone and an "events" channel, its events told only while it is the call's.
  newPeer() {
    const pc = new RTCPeerConnection({
      iceServers: this.ice.iceServers || [],
      iceTransportPolicy: this.iceTransportPolicy || this.ice.iceTransportPolicy || "all",
    });
    for (const track of this.mic.getAudioTracks()) pc.addTrack(track, this.mic);
    const events = pc.createDataChannel("events");
    events.onmessage = (message) => { if (pc === this.pc) this.emit("event", JSON.parse(message.data)); };
    pc.ontrack = (event) => {
      if (pc !== this.pc) return;
      this.remoteStream = event.streams[0] || new MediaStream([event.track]);
      this.emit("remote", this.remoteStream);
    };
    const onState = () => {
      if (pc !== this.pc || this.ended) return;
      this.emit("state", pc.connectionState);
      this.reconnector.onState(pc);
    };
    pc.onconnectionstatechange = onState;
    pc.oniceconnectionstatechange = onState;
    return pc;
  }

  // Offer from `pc` (the server takes no trickled candidates: a complete offer) to `path`. A restart's
  // offer waits less: the server learns the caller's address from its ICE checks anyway.
  async offer(pc, path, extra, gatherMs = 3000) {
    await pc.setLocalDescription(await pc.createOffer());
    await gatheringComplete(pc, gatherMs);
    if (pc.getConfiguration().iceTransportPolicy === "relay" && !pc.localDescription.sdp.includes(" typ relay")) {
      pc.close();
      throw new CallError("No TURN relay could be reached: the relay server is down or refused our credentials.");
    }
    return postJson(path, { sdp: pc.localDescription.sdp, type: "offer", ...extra });
  }

  // An ICE restart of the call's connection (new ICE credentials, same DTLS session). Throws ReconnectError.
  async sendIceRestart() {
    const pc = this.pc;
    pc.restartIce();
    const { response, body } = await this.offer(pc, `${this.sessionUrl}/offer`, { token: this.resumeToken }, 1000);
    if (!response.ok) {
      await pc.setLocalDescription({ type: "rollback" }).catch(() => {});
      throw new ReconnectError(response.status, body);
    }
    if (pc === this.pc && !this.ended) await pc.setRemoteDescription({ sdp: body.sdp, type: body.type });
  }

  // The call on a new peer connection with the same microphone. The old one is closed only once the server
  // has taken the new one: its DTLS close would otherwise end the call there. Throws ReconnectError.
  async sendResume() {
    const pc = this.newPeer();
    const resumeUrl = new URL("/offer", new URL(this.sessionUrl, location.href)); // the call's replica
    let answer;
    try {
      answer = await this.offer(pc, resumeUrl.href, { resume: { session_id: this.sessionId, token: this.resumeToken } });
    } catch (error) {
      pc.close();
      throw error;
    }
    const { response, body } = answer;
    if (!response.ok || this.ended) {
      pc.close();
      throw new ReconnectError(response.status, body);
    }
    const old = this.pc;
    this.pc = pc;
    this.resumeToken = body.resume_token || this.resumeToken;
    old.close();
    await pc.setRemoteDescription({ sdp: body.sdp, type: body.type });
  }

  // The server ended the call (or the resume window passed): say so with the server's own reason.
  async endAsServerSays() {
    let summary = {};
    try {
      const response = await apiFetch(this.sessionUrl, { cache: "no-store" });
      summary = await response.json();
    } catch (_) { /* the server cannot be reached: say what we know */ }
    if (summary.end_reason) {
      this.finish(`the server ended it while we reconnected: ${summary.end_reason}`);
    } else if (summary.session_id && !summary.ended) {
      await this.hangUp(`the connection could not be restored within the ${this.resumeWindowS} s the server waits`);
    } else {
      this.finish(summary.error ? `the call ended on the server (${summary.error})`
        : "the connection could not be restored, and the server cannot be reached");
    }
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
    this.reconnector.stop();
    if (this.sessionId) {
      // Say goodbye before closing: a closed peer connection sends RTCP BYE at once, and the server
      // would count the call as a vanished caller. keepalive lets the request outlive a closing page;
      // a slow server does not hold the hang-up for more than a second.
      const goodbye = apiFetch(this.sessionUrl, { method: "DELETE", keepalive: true }).catch(() => {});
      await Promise.race([goodbye, new Promise((resolve) => setTimeout(resolve, 1000))]);
    }
    this.finish(reason);
  }

  finish(reason) {
    if (this.ended) return;
    this.ended = true;
    this.reconnector.stop();
    this.close();
    this.emit("ended", reason);
  }
}
