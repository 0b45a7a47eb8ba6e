// The page: wires the call to buttons, meters, transcript and statistics.
import { Call, CallError } from "./call.js";
import { LevelMeter } from "./meters.js";

const $ = (id) => document.getElementById(id);
const ui = {
  call: $("call"), hangup: $("hangup"), message: $("message"), model: $("model"), banner: $("test-banner"),
  transcript: $("transcript"), audio: $("remote-audio"), meterIn: $("meter-in"), meterOut: $("meter-out"),
  state: $("stat-state"), rtt: $("stat-rtt"), jitter: $("stat-jitter"), loss: $("stat-loss"),
};

let call = null;
let meters = [];
let statsTimer = null;
let audioContext = null;

function say(text, isError = false) {
  ui.message.textContent = text;
  ui.message.classList.toggle("error", isError);
}

function showModel(status) {
  ui.model.textContent = `Model: ${status.model}`;
  if (status.test_model) {
    ui.banner.textContent = status.notice || "TEST MODEL: random weights, it babbles.";
    ui.banner.hidden = false;
  }
}

async function loadStatus() {
  try {
    const response = await fetch("/status");
    const status = await response.json();
    if (!status.ready) {
      say("The model is warming up…");
      setTimeout(loadStatus, 2000);
      return;
    }
    showModel(status);
    ui.call.disabled = false;
    say(status.free_slots > 0 ? "Ready. Press Call and start talking." : "The line is busy right now.");
  } catch (_) {
    say("The server cannot be reached.", true);
    setTimeout(loadStatus, 3000);
  }
}

function onEvent(event) {
  switch (event.type) {
    case "ready":
      showModel({ model: event.model, test_model: event.test_model, notice: event.notice });
      say("Connected. Talk to Moshi.");
      break;
    case "text":
      ui.transcript.textContent += event.text;
      ui.transcript.scrollTop = ui.transcript.scrollHeight;
      break;
    case "error":
      say(`Error: ${event.reason}`, true);
      break;
    case "bye":
      endCall(`Call ended: ${event.reason}.`);
      break;
  }
}

async function updateStats() {
  const stats = call && (await call.stats());
  if (!stats) return;
  ui.rtt.textContent = stats.rttMs === null ? "–" : `${stats.rttMs.toFixed(0)} ms`;
  ui.jitter.textContent = stats.jitterMs === null ? "–" : `${stats.jitterMs.toFixed(1)} ms`;
  ui.loss.textContent = stats.lossPercent === null ? "–" : `${stats.lossPercent.toFixed(1)} %`;
}

function endCall(text, isError = false) {
  if (statsTimer) clearInterval(statsTimer);
  statsTimer = null;
  meters.forEach((m) => m.stop());
  meters = [];
  if (call) call.hangUp(text);
  call = null;
  ui.call.disabled = false;
  ui.hangup.disabled = true;
  ui.state.textContent = "idle";
  say(text, isError);
}

async function startCall() {
  ui.call.disabled = true;
  ui.transcript.textContent = "";
  say("Asking for the microphone…");
  audioContext = audioContext || new AudioContext();
  await audioContext.resume();
  call = new Call();
  window.moshiCall = call; // for debugging and automated checks
  call.addEventListener("mic", (e) => meters.push(new LevelMeter(audioContext, e.detail, ui.meterIn)));
  call.addEventListener("remote", (e) => {
    ui.audio.srcObject = e.detail;
    meters.push(new LevelMeter(audioContext, e.detail, ui.meterOut));
  });
  call.addEventListener("event", (e) => onEvent(e.detail));
  call.addEventListener("state", (e) => { ui.state.textContent = e.detail; });
  call.addEventListener("ended", (e) => { if (call) endCall(`Call ended: ${e.detail}.`); });
  try {
    say("Calling…");
    await call.start();
    ui.hangup.disabled = false;
    statsTimer = setInterval(updateStats, 1000);
  } catch (error) {
    endCall(error instanceof CallError ? error.message : `The call failed: ${error}`, true);
  }
}

ui.call.addEventListener("click", startCall);
ui.hangup.addEventListener("click", () => endCall("You hung up."));
window.addEventListener("pagehide", () => { if (call) call.hangUp("page closed"); });
loadStatus();
