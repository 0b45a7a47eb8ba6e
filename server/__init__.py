"""moshi-webrtc's server side, in layers along the data path; imports only point down the list.

- `server.audio`:  PCM in the engine's shape (resampling to 24 kHz float32 mono, audio files).
- `server.model`:  the steppers that run a model one 80 ms frame at a time, and what they need
  (sources and checks, tokens, sampling, personas and voices, the tiny and echo test models).
- `server.engine`: call slots on one model, the inference thread, and the process boundary
  between the engine process and the media workers.
- `server.media`:  the WebRTC side of a call: the peer, the receive path (jitter buffer, Opus FEC and
  concealment), the paced outbound track, ICE/TURN, and the media worker processes.
- `signaling` (a top-level package): HTTP offer/answer, WHIP, guards and metrics over the above.
- Tools on top: `server.cli` (the `moshi-webrtc` command), `server.caller` (a headless caller),
  `server.worker` (a media worker process's main).
"""
