// The page: wires the call to buttons, meters, transcript and statistics.
import { apiFetch, hasToken } from "./api.js";
import { Call, CallError } from "./call.js";
import { LevelMeter } from "./meters.js";

const $ = (id) => document.getElementById(id);
const ui = {
  call: $("call"), hangup: $("hangup"), message: $("message"), model: $("model"), banner: $("test-banner"),
  transcript: $("transcript"), audio: $("remote-audio"), meterIn: $("meter-in"), meterOut: $("meter-out"),
  state: $("stat-state"), rtt: $("stat-rtt"), jitter: $("stat-jitter"), loss: $("stat-loss"),
  persona: $("persona"), prompt: $("persona-prompt"), voice: $("persona-voice"), promptCount: $("persona-count"),
};

let call = null;
let meters = [];
let meterOut = null; // the meter of the call's reply: a resume brings a new stream
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

// A PersonaPlex-style model takes a text prompt and a voice per call; others take none, and the
// section stays hidden so the page never sends what the model would refuse.
async function loadPersonas() {
  const response = await apiFetch("/personas");
  const personas = await response.json();
  if (!personas.takes_persona) return;
  ui.prompt.value = personas.default_prompt;
  ui.prompt.maxLength = personas.max_prompt_chars;
  const countChars = () => { ui.promptCount.textContent = `${ui.prompt.value.length}/${personas.max_prompt_chars}`; };
  ui.prompt.addEventListener("input", countChars);
  countChars();
  ui.voice.replaceChildren(...personas.voices.map((name) => new Option(name, name, false, name === personas.default_voice)));
  ui.persona.hidden = false;
}

function chosenPersona() {
  if (ui.persona.hidden) return null;
  return { prompt: ui.prompt.value, voice: ui.voice.value };
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
    if (status.auth && !hasToken()) {
      say("This server needs an access token: open the link you were given (it ends in #token=…).", true);
      return;
    }
    await loadPersonas();
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
      say(event.prompting ? "Connected. The model is reading its role…" : "Connected. Talk to Moshi.");
      break;
    case "prompt":
      say(`Ready (role read in ${event.seconds.toFixed(1)} s). Talk to Moshi.`);
      break;
    case "text":
      ui.transcript.textContent += event.text;
      ui.transcript.scrollTop = ui.transcript.scrollHeight;
      break;
    case "drops":
      say(`The model is behind: ${event.output_ms} ms of its audio skipped so far to keep the delay short.`);
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
  call.lastStats = stats; // read by the automated browser test
  ui.rtt.textContent = stats.rttMs === null ? "–" : `${stats.rttMs.toFixed(0)} ms`;
  ui.jitter.textContent = stats.jitterMs === null ? "–" : `${stats.jitterMs.toFixed(1)} ms`;
  ui.loss.textContent = stats.lossPercent === null ? "–" : `${stats.lossPercent.toFixed(1)} %`;
}

function endCall(text, isError = false) {
  if (statsTimer) clearInterval(statsTimer);
  statsTimer = null;
  meters.forEach((m) => m.stop());
  meters = [];
  meterOut = null;
  const ending = call;
  call = null; // first, so the "ended" event this raises is ignored
  if (ending) ending.hangUp(text);
  ui.call.disabled = false;
  ui.prompt.disabled = ui.voice.disabled = false;
  ui.hangup.disabled = true;
  ui.state.textContent = "idle";
  say(text, isError);
}

async function startCall() {
  ui.call.disabled = true;
  ui.prompt.disabled = ui.voice.disabled = true;
  ui.transcript.textContent = "";
  say("Asking for the microphone…");
  audioContext = audioContext || new AudioContext();
  // Without a sound device (a headless browser, a machine with none) resume() may never settle: the call
  // goes ahead after a moment, with silent meters, rather than hanging at "Asking for the microphone".
  await Promise.race([audioContext.resume(), new Promise((resolve) => setTimeout(resolve, 2000))]);
  const thisCall = new Call({ persona: chosenPersona() });
  call = thisCall;
  window.moshiCall = thisCall; // for debugging and automated checks
  // Events of a call that has already ended (a late "bye") must not touch the page.
  const on = (type, handler) => thisCall.addEventListener(type, (e) => { if (call === thisCall) handler(e.detail); });
  on("mic", (stream) => meters.push(new LevelMeter(audioContext, stream, ui.meterIn)));
  on("remote", (stream) => {
    ui.audio.srcObject = stream;
    if (meterOut) meterOut.stop();
    meters = meters.filter((m) => m !== meterOut);
    meterOut = new LevelMeter(audioContext, stream, ui.meterOut);
    meters.push(meterOut);
  });
  on("event", onEvent);
  on("state", (state) => { ui.state.textContent = state; });
  on("reconnecting", (seconds) => say(`Reconnecting… ${seconds} s`));
  on("reconnected", () => say("Connected again. Talk to Moshi."));
  on("ended", (reason) => endCall(`Call ended: ${reason}.`));
  try {
    say("Calling…");
    await thisCall.start();
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
