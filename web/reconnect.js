// A call that outlives a network change (the server's side: server/media/handover.py, signaling/recovery.py).
//
// When the connection drops ("disconnected"), the page waits a moment (it often recovers alone), then
// restarts ICE on the same peer connection. If that request fails, the connection fails, or it is still
// down a while after the restart, the page resumes the call on a new peer connection with the same
// microphone, every few seconds while the server's resume window lasts. The server keeps the call's slot
// and the model's context meanwhile. A call the server ended is told with the server's own reason.

const GRACE_MS = 1000; // "disconnected" often heals by itself within a second
const SETTLE_MS = 5000; // how long a restart or a resume gets to bring the connection back
const RESUME_EVERY_MS = 2000;
const STALL_MS = 1500; // no audio packet this long on a "connected" connection: its path is gone
const WATCH_EVERY_MS = 500;

// The audio bytes the connection has received so far.
async function inboundBytes(pc) {
  const stats = await pc.getStats();
  for (const s of stats.values()) if (s.type === "inbound-rtp" && s.kind === "audio") return s.bytesReceived;
  return 0;
}

export class ReconnectError extends Error {
  constructor(status, body) {
    super((body && body.error) || `the server answered ${status}`);
    this.status = status; // an HTTP status, or null for a network error
    this.body = body || {};
  }

  get callIsGone() { return this.status === 403 || this.status === 404 || this.status === 410; }
}

export function isConnected(pc) {
  return pc.connectionState === "connected" && ["connected", "completed"].includes(pc.iceConnectionState);
}

// Drives one call's recovery. The call gives it `pc`, `resumeWindowS`, `ended`, and does each step:
// `sendIceRestart()`, `sendResume()` (both throw ReconnectError), `endAsServerSays()`, `emit(type, detail)`.
export class Reconnector {
  constructor(call) {
    this.call = call;
    this.log = []; // [{what: "restart" | "resume", ok, status?, error?}], read by the tests
    this.troubleSince = null; // when the connection went down (ms), null while it is up
    this.phase = "up"; // up, grace, restarting, resuming, ended
    this.timer = null; // the next step
    this.ticker = null; // the "Reconnecting… N s" counter
    this.watcher = null; // the media watch (watchMedia)
    this.heard = { pc: null, bytes: 0, at: 0 }; // when the current connection's audio bytes last grew
  }

  // Watch the received audio as well as ICE's states: the server sends audio all the time, and it stops
  // well before Chromium calls a dead path "disconnected" (2.5 s or more), or while the state still reads
  // "connected" (a path that dies one way).
  watchMedia() {
    if (this.watcher !== null) return;
    this.heard = { pc: this.call.pc, bytes: 0, at: Date.now() };
    this.watcher = setInterval(() => this.checkMedia().catch(() => {}), WATCH_EVERY_MS);
  }

  async checkMedia() {
    const pc = this.call.pc;
    if (!pc || this.phase === "ended") return;
    const bytes = await inboundBytes(pc);
    if (pc !== this.heard.pc || bytes !== this.heard.bytes) {
      const grew = pc === this.heard.pc && bytes > this.heard.bytes;
      this.heard = { pc, bytes, at: Date.now() };
      if (grew && this.phase !== "up" && isConnected(pc)) this.recovered(); // back without a state change
    } else if (this.phase === "up" && bytes > 0 && !this.mediaFlowing()) {
      this.trouble(false);
    }
  }

  mediaFlowing() {
    return this.heard.pc === this.call.pc && Date.now() - this.heard.at < STALL_MS;
  }

  // Every connection or ICE state change of the call's current peer connection.
  onState(pc) {
    if (this.phase === "ended") return;
    if (isConnected(pc)) this.recovered();
    else if (pc.connectionState === "failed" || pc.iceConnectionState === "failed") this.trouble(true);
    else if (pc.connectionState === "disconnected" || pc.iceConnectionState === "disconnected") this.trouble(false);
  }

  trouble(failed) {
    if (this.troubleSince === null) {
      this.troubleSince = Date.now();
      const tick = () => this.call.emit("reconnecting", Math.round((Date.now() - this.troubleSince) / 1000));
      tick();
      this.ticker = setInterval(tick, 1000);
      if (this.phase === "up") {
        this.phase = "grace";
        this.later(GRACE_MS, () => this.restartIce());
      }
    }
    // A failed connection cannot be restarted by ICE alone: a new one. A resume already under way goes on.
    if (failed && this.phase !== "resuming") this.resume();
  }

  recovered() {
    this.stopTimers();
    this.phase = "up";
    if (this.troubleSince !== null) {
      this.troubleSince = null;
      this.call.emit("reconnected");
    }
  }

  // Restart ICE now (the tests call it through call.restartIce()); resumes if that does not work.
  async restartIce() {
    if (this.phase === "ended" || this.phase === "resuming") return;
    this.phase = "restarting";
    this.later(SETTLE_MS, () => this.checkBack()); // a request that hangs must not hold the call
    const pc = this.call.pc;
    const ok = await this.attempt("restart", () => this.call.sendIceRestart());
    if (this.phase !== "restarting" || pc !== this.call.pc) return; // ended, or resumed meanwhile
    if (ok === true) this.later(SETTLE_MS, () => this.checkBack());
    else if (ok === false) this.resume(); // the gone case already ended the call
  }

  // Resume on a new peer connection now, and again every few seconds while the resume window lasts.
  async resume() {
    if (this.phase === "ended") return;
    this.stopTimers(false);
    this.phase = "resuming";
    if (this.troubleSince !== null && Date.now() - this.troubleSince > 1000 * this.call.resumeWindowS) {
      this.end();
      return;
    }
    const ok = await this.attempt("resume", () => this.call.sendResume());
    if (this.phase !== "resuming") return;
    if (ok === true) this.later(SETTLE_MS, () => this.checkBack());
    else if (ok === false) {
      this.trouble(false); // the window counts from here when a resume the tests asked for failed
      this.later(RESUME_EVERY_MS, () => this.resume());
    }
  }

  // After a step had its time: back up, or try a resume (again).
  checkBack() {
    if (isConnected(this.call.pc) && this.mediaFlowing()) this.recovered();
    else {
      this.trouble(false); // the counter starts here when a step the tests asked for left the call down
      this.resume();
    }
  }

  // One request: true when it was answered, false when it failed and may be tried again, null when the
  // server says the call is over (then the call is ended with the server's reason).
  async attempt(what, step) {
    try {
      await step();
      this.log.push({ what, ok: true });
      return true;
    } catch (error) {
      const status = error instanceof ReconnectError ? error.status : null;
      this.log.push({ what, ok: false, status, error: String(error.message || error) });
      if (error instanceof ReconnectError && error.callIsGone) {
        this.end();
        return null;
      }
      return false;
    }
  }

  end() {
    if (this.phase === "ended") return;
    this.stop();
    if (!this.call.ended) this.call.endAsServerSays();
  }

  later(ms, step) {
    clearTimeout(this.timer);
    this.timer = setTimeout(step, ms);
  }

  stopTimers(counter = true) {
    clearTimeout(this.timer);
    this.timer = null;
    if (counter) {
      clearInterval(this.ticker);
      this.ticker = null;
    }
  }

  stop() {
    this.stopTimers();
    clearInterval(this.watcher);
    this.watcher = null;
    this.phase = "ended";
  }
}
