"""The `moshi-webrtc` command: `serve` the model to WebRTC callers, or `call` a server from a WAV file.

This is the one place where the pieces are wired together for a person:
model source -> engine -> signaling app -> HTTP listener.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys

from .media.turn import TURN_SECRET_ENV
from .model.persona import PersonaLimits

WHIP_TOKEN_ENV = "MOSHI_WEBRTC_WHIP_TOKEN"
API_TOKEN_ENV = "MOSHI_WEBRTC_API_TOKEN"
EXIT_DEVICE_FAILED = 70  # EX_SOFTWARE: a supervisor should restart the process

log = logging.getLogger("moshi_webrtc")

AUTO = "auto"


def _banner(lines: list[str]) -> str:
    width = max(len(line) for line in lines) + 4
    bar = "*" * width
    return "\n".join([bar, *(f"* {line.ljust(width - 4)} *" for line in lines), bar])


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=AUTO,
                        help="auto (moshiko on a GPU, else tiny), tiny, tiny-persona, echo, a Hugging Face repo id "
                             "(e.g. nvidia/personaplex-7b-v1), a directory, or random-moshiko / "
                             "random-personaplex (real-size, random weights: GPU capacity tests without weights)")
    parser.add_argument("--revision", help="Hugging Face revision (branch, tag or commit)")
    parser.add_argument("--moshi-weight", help="local Moshi weights file (overrides the repo's)")
    parser.add_argument("--mimi-weight", help="local Mimi weights file (overrides the repo's)")
    parser.add_argument("--tokenizer", help="local sentencepiece tokenizer (overrides the repo's)")
    parser.add_argument("--config-path", help="local config.json (overrides the repo's)")
    parser.add_argument("--lora-weight", help="local LoRA weights file")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moshi-webrtc", description="Talk to Moshi over WebRTC.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the model to WebRTC callers")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8080)
    _add_model_options(serve)
    serve.add_argument("--max-calls", type=int, default=4, help="simultaneous calls (engine batch size)")
    serve.add_argument("--switch-interval-ms", type=float, default=None, metavar="MS",
                       help="the engine process's GIL switch interval (Python's default: 5 ms)")
    serve.add_argument("--media-workers", type=int, default=None, metavar="N",
                       help="processes for WebRTC media around the one engine process; 0: media in the engine's "
                            "own process (default: one per 8 calls, at most cores - 1)")
    serve.add_argument("--cpu-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                       help="torch threads when the model runs on the CPU (default: all cores but one, "
                            "which the event loop needs for the calls' media)")
    serve.add_argument("--max-backlog-frames", type=int, default=3,
                       help="80 ms frames a call may have waiting for the model; past it the oldest are dropped "
                            "so the delay stays bounded")
    serve.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    serve.add_argument("--temp", type=float, help="audio sampling temperature (default: the checkpoint's, 0.8)")
    serve.add_argument("--temp-text", type=float, help="text sampling temperature (default 0.7)")
    serve.add_argument("--top-k", type=int, help="audio top-k (default 250)")
    serve.add_argument("--top-k-text", type=int, help="text top-k (default 25)")
    serve.add_argument("--kv-attention", choices=["ring", "window", "fused"], default="ring",
                       help="how the LM's attention reads each call's 4-minute KV ring: all of it (moshi's, the "
                            "default); window: only the filled part, a CUDA graph per length (same output); fused: "
                            "our kernel, each call over its own filled entries, int8 read as stored")
    serve.add_argument("--kv-cache", choices=["model", "int8", "fp8"], default="model",
                       help="KV cache storage: the model's dtype (default), int8 with a scale per head and entry "
                            "(half the memory per call, logits close to bf16), or fp8 e4m3 (half, coarser)")
    serve.add_argument("--bench-kv-age", type=int, default=0, metavar="FRAMES",
                       help="benchmarks only: every call starts FRAMES frames old to the LM's attention (3000: its "
                            "ring full, a call past 4 minutes), with a zeroed history; needs a --kv option")
    serve.add_argument("--ice-server", action="append", default=[], metavar="URL",
                       help="STUN/TURN server for both sides, e.g. stun:host:3478 or turn:user:pass@host:3478 "
                            "(repeatable)")
    serve.add_argument("--turn-url", action="append", default=[], metavar="URL",
                       help="TURN server that gets short-lived TURN REST credentials, e.g. "
                            "turn:turn.example.org:3478?transport=udp (repeatable; needs --turn-secret)")
    serve.add_argument("--turn-secret", default=os.environ.get(TURN_SECRET_ENV),
                       help=f"the secret shared with coturn's --static-auth-secret (or ${TURN_SECRET_ENV})")
    serve.add_argument("--turn-ttl", type=int, default=3600, help="lifetime of issued TURN credentials, seconds")
    serve.add_argument("--ice-transport-policy", choices=["all", "relay"], default="all",
                       help="relay: the server's peer and the page use TURN relay candidates only")
    serve.add_argument("--ice-host-address", action="append", default=[], metavar="IP",
                       help="offer host candidates only on this local address (repeatable; default: all)")
    fleet = serve.add_argument_group("many replicas (docs/SCALING.md)")
    fleet.add_argument("--drain-seconds", type=float, default=0.0,
                       help="on SIGTERM, take no new calls (/readyz 503) and let calls in progress go on this long, "
                            "then end the rest (bye: server_restart) and exit 0; a second signal ends them at once")
    fleet.add_argument("--replica-id", type=_replica_id, default=None, metavar="ID",
                       help="this replica's name: session ids start with 'ID.', so a balancer can route a call's "
                            "/sessions/{id} and /whip/{id} requests to it (e.g. the pod name)")
    fleet.add_argument("--public-url", default=None, metavar="URL",
                       help="this replica's own URL (e.g. https://pod-0.calls.example.org): WHIP Location and "
                            "session_url are absolute on it, so a call's later requests come straight here")
    serve.add_argument("--server-stun-turn", action="store_true",
                       help="with policy all, the server's own peer gathers STUN/TURN candidates too (each answer "
                            "waits for them, 5 s when one does not answer); for a server behind NAT. Default: "
                            "host candidates only; relay-only always uses TURN")
    guard = serve.add_argument_group("protection (docs/OPERATIONS.md)")
    guard.add_argument("--api-token", "--whip-token", dest="api_token",
                       default=os.environ.get(API_TOKEN_ENV) or os.environ.get(WHIP_TOKEN_ENV),
                       help=f"bearer token for /offer, /sessions, /whip, /ice-servers, /personas (or ${API_TOKEN_ENV});"
                            " default: open. The page takes it from its URL: /#token=...")
    guard.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="another origin whose pages may call the API, e.g. https://app.example.org (repeatable); "
                            "default: same origin only")
    guard.add_argument("--max-offers-per-minute", type=int, default=20,
                       help="offers (/offer, /whip) one client address may make per minute; 0: no limit")
    guard.add_argument("--max-calls-per-client", type=int, default=None,
                       help="calls one client address may hold at once, connected or being set up (default: a "
                            "quarter of --max-calls, at least 1); 0: no limit")
    guard.add_argument("--max-connections", type=int, default=512,
                       help="open HTTP connections, all clients together; past it new ones are closed; 0: no cap")
    guard.add_argument("--max-connections-per-client", type=int, default=64,
                       help="open HTTP connections from one address (not applied with --trust-forwarded-for, where "
                            "every connection comes from the proxy); 0: no cap")
    guard.add_argument("--request-timeout", type=float, default=10.0,
                       help="seconds a connection has for a complete request head (after opening, or after its last "
                            "answer: idle keep-alive ends then too), and a request for its body")
    guard.add_argument("--trust-forwarded-for", action="store_true",
                       help="behind a reverse proxy: take the client's address from X-Forwarded-For")
    guard.add_argument("--media-timeout", type=float, default=10.0,
                       help="end a call whose caller sends no audio for this many seconds (a vanished caller)")
    guard.add_argument("--resume-window", type=float, default=30.0,
                       help="seconds a call whose caller went away (its media stopped past the media timeout, or its "
                            "connection failed) keeps its slot and model context for the caller to come back: the same "
                            "path, an ICE restart, or a resume on a new connection with its resume_token; 0: such a "
                            "call ends at once")
    guard.add_argument("--connect-timeout", type=float, default=5.0,
                       help="end an answered call whose connection is not up this many seconds later (its slot "
                            "is free again); 0: wait for the media timeout")
    guard.add_argument("--max-call-minutes", type=float, default=60.0,
                       help="end a call after this many minutes; 0: no limit")
    guard.add_argument("--no-exit-on-fatal", dest="exit_on_fatal", action="store_false",
                       help="stay up (unhealthy) after the model's device fails, instead of exiting with status 70 "
                            "for a supervisor to restart")
    persona = serve.add_argument_group("personas (PersonaPlex-style models)")
    persona.add_argument("--voices", help="folder of voice clips (wav, flac, mp3...) and/or PersonaPlex .pt voices, "
                                          "or a voices.tgz holding them")
    persona.add_argument("--default-voice", help="voice for calls that name none (default: the first by name)")
    persona.add_argument("--default-prompt", help="text prompt for calls that send none (default: PersonaPlex's)")
    persona.add_argument("--max-prompt-chars", type=int, default=PersonaLimits.max_prompt_chars)
    persona.add_argument("--max-prompt-tokens", type=int, default=PersonaLimits.max_prompt_tokens,
                         help="each token is one model step of replay before the call starts")
    persona.add_argument("--max-voice-seconds", type=float, default=PersonaLimits.max_voice_seconds)
    serve.add_argument("--log-level", default="INFO")

    precompute = commands.add_parser(
        "voice-prompt", help="turn a voice clip into a precomputed PersonaPlex .pt voice (skips encoding per call)")
    precompute.add_argument("clip", help="the voice clip (wav, flac, mp3...), at most --max-voice-seconds")
    precompute.add_argument("--out", required=True, help="where to write the .pt voice")
    precompute.add_argument("--max-voice-seconds", type=float, default=PersonaLimits.max_voice_seconds)
    precompute.add_argument("--log-level", default="WARNING")
    _add_model_options(precompute)

    call = commands.add_parser("call", help="call a server with a WAV file and record the reply")
    call.add_argument("input", help="audio file to speak (WAV or anything PyAV reads)")
    call.add_argument("--out", required=True, help="where to write the reply, 24 kHz mono WAV")
    call.add_argument("--url", default="http://127.0.0.1:8080", help="the server's base URL")
    call.add_argument("--tail", type=float, default=1.0, help="seconds to keep listening after the file ends")
    call.add_argument("--ice-server", action="append", default=[], metavar="URL")
    call.add_argument("--ice-host-address", action="append", default=[], metavar="IP")
    call.add_argument("--relay", action="store_true", help="use TURN relay candidates only")
    call.add_argument("--prompt", help="persona text prompt (PersonaPlex-style models)")
    call.add_argument("--voice", help="persona voice, one of the server's (GET /personas)")
    call.add_argument("--token", default=os.environ.get(API_TOKEN_ENV), help="the server's API token, if it has one")
    call.add_argument("--log-level", default="WARNING")
    return parser


# -- serve --------------------------------------------------------------------------------------


def _engine_for(args: argparse.Namespace, model: str):
    from .engine.setup import create_engine
    from .model.kv_compat import KvOptions
    from .model.moshi_step import SamplingConfig
    from .model.source import ModelSource

    source = ModelSource(model=model, revision=args.revision, moshi_weight=args.moshi_weight,
                         mimi_weight=args.mimi_weight, tokenizer=args.tokenizer, config_path=args.config_path,
                         lora_weight=args.lora_weight)
    sampling = SamplingConfig(use_sampling=False if args.greedy else None, temp=args.temp, temp_text=args.temp_text,
                              top_k=args.top_k, top_k_text=args.top_k_text)
    try:
        kv = KvOptions(args.kv_attention, args.kv_cache, args.bench_kv_age)
    except ValueError as exc:
        raise SystemExit(f"moshi-webrtc serve: {exc}") from None
    return create_engine(source, max_calls=args.max_calls, max_backlog_frames=args.max_backlog_frames,
                         device=args.device, sampling=sampling, cpu_threads=args.cpu_threads,
                         voices=_voice_options(args, model), kv=kv)


def _voice_options(args: argparse.Namespace, model: str):
    """None unless an operator set a persona option: a model that takes no persona then refuses to start."""
    from pathlib import Path

    from .model.persona_step import VoiceOptions
    from .model.voices import voices_folder

    limits = PersonaLimits(args.max_prompt_chars, args.max_prompt_tokens, args.max_voice_seconds)
    if not (args.voices or args.default_voice or args.default_prompt is not None) and limits == PersonaLimits():
        return None
    folder = voices_folder(Path(args.voices)) if args.voices else None
    synthetic = None
    if folder is None and model == "tiny-persona":
        from .model.persona_step import synthetic_voices

        synthetic = synthetic_voices()
    return VoiceOptions(folder=folder, synthetic=synthetic, limits=limits, default_voice=args.default_voice,
                        default_prompt=args.default_prompt)


def _first_choice(args: argparse.Namespace) -> str:
    if args.model != AUTO:
        return args.model
    import torch  # here, not at the top: media worker processes re-import this module and need no torch
    from moshi.models.loaders import DEFAULT_REPO

    if torch.cuda.is_available():
        return DEFAULT_REPO
    return "tiny-persona" if getattr(args, "voices", None) or args.command == "voice-prompt" else "tiny"


def _replica_id(text: str) -> str:
    """A replica id goes into session ids and URLs, and a balancer matches on it: letters, digits and '-'."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: a replica id is 1-63 letters, digits or '-'")
    return text


def ice_warnings(ice) -> list[str]:
    """What an operator should know about the ICE servers given: aiortc ignores some of them."""
    unused = ice.unused_by_aiortc()
    if not unused:
        return []
    return [f"aiortc uses only the first STUN and the first TURN URL: the server's own peer ignores "
            f"{', '.join(unused)}; callers still get every URL (GET /ice-servers, WHIP Link headers), and "
            "browsers use them all (docs/DEPLOYMENT.md)"]


async def serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from signaling.app import SignalingConfig, SignalingService
    from signaling.connections import ConnectionLimits

    from .media.ice import IceConfig, parse_ice_server, use_host_addresses
    from .media.workers import MediaWorkers, default_worker_count
    from .worker import worker_main

    use_host_addresses(args.ice_host_address or None)
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    if args.turn_url and not args.turn_secret:
        log.critical("--turn-url needs --turn-secret (or $%s)", TURN_SECRET_ENV)
        return 2
    ice = IceConfig(tuple(parse_ice_server(url) for url in args.ice_server), turn_urls=tuple(args.turn_url),
                    turn_secret=args.turn_secret, turn_ttl_s=args.turn_ttl,
                    relay_only=args.ice_transport_policy == "relay", server_gathers=args.server_stun_turn)
    try:
        ice.validate()
    except ValueError as exc:
        log.critical("%s", exc)
        return 2
    for warning in ice_warnings(ice):
        log.warning("%s", warning)
    model = _first_choice(args)
    engine = _engine_for(args, model)
    config = SignalingConfig(
        ice=ice, media_timeout_s=args.media_timeout, resume_window_s=max(0.0, args.resume_window),
        connect_timeout_s=args.connect_timeout or None,
        api_token=args.api_token, cors_origins=tuple(args.cors_origin),
        max_offers_per_minute=args.max_offers_per_minute, trust_forwarded_for=args.trust_forwarded_for,
        max_calls_per_client=args.max_calls_per_client,
        connections=ConnectionLimits(
            max_connections=args.max_connections,
            max_per_address=0 if args.trust_forwarded_for else args.max_connections_per_client,
            head_timeout_s=args.request_timeout, body_timeout_s=args.request_timeout,
            keepalive_timeout_s=args.request_timeout + 5),
        max_call_s=60 * args.max_call_minutes if args.max_call_minutes > 0 else None,
        session_id_prefix=f"{args.replica_id}." if args.replica_id else "", public_url=args.public_url)
    worker_count = default_worker_count(args.max_calls) if args.media_workers is None else args.media_workers
    workers = None
    if worker_count > 0:
        workers = MediaWorkers(engine, worker_count, config, worker_main, host_addresses=args.ice_host_address or None,
                               log_level=args.log_level.upper())
    service = SignalingService(engine, config, workers=workers)
    runner = await service.start_runner()
    await web.TCPSite(runner, args.host, args.port).start()
    log.info("listening on http://%s:%d (healthz answers 503 until the model is warm)", args.host, args.port)
    try:
        await engine.start()
    except Exception as exc:
        await engine.stop()
        if args.model != AUTO or model == "tiny":
            log.critical("refusing to start: %s", exc)
            await runner.cleanup()
            return 1
        log.error("could not load %s (%s); falling back to the tiny test model", model, exc)
        engine = _engine_for(args, "tiny")
        service.use_engine(engine)
        if workers is not None:
            workers.use_engine(engine)
        await engine.start()
    if workers is not None:
        await workers.start()
        log.info("%d media worker process(es) serve the calls", worker_count)
    info = engine.info
    if info.is_test_model:
        print(_banner([info.notice or "TEST MODEL", f"model: {info.name}",
                       "For the real Moshi, run on a CUDA host: --model kyutai/moshiko-pytorch-bf16"]),
              file=sys.stderr, flush=True)
    print(f"moshi-webrtc: {info.name} ready for {engine.batch_size} calls at http://{args.host}:{args.port}/",
          file=sys.stderr, flush=True)

    stop = asyncio.Event()
    status = {"code": 0}
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)

    def on_fatal(exc: BaseException) -> None:
        log.critical("%s", exc)
        if args.exit_on_fatal:
            status["code"] = EXIT_DEVICE_FAILED
            loop.call_later(1.0, stop.set)  # a moment for the calls' error messages to go out

    engine.fatal_listeners.append(on_fatal)
    await stop.wait()
    if status["code"] == 0:  # a SIGTERM or SIGINT: drain; a second one ends the calls at once
        draining = asyncio.ensure_future(service.drain(args.drain_seconds))
        stop.clear()
        stopped_again = asyncio.ensure_future(stop.wait())
        await asyncio.wait({draining, stopped_again}, return_when=asyncio.FIRST_COMPLETED)
        if not draining.done():
            log.warning("asked again to stop: ending the calls now")
            draining.cancel()
            await service.end_all_calls("server_restart", kind="server_restart")
        stopped_again.cancel()
    log.info("shutting down")
    if workers is not None:
        await workers.stop()
    await runner.cleanup()
    await engine.stop()
    return status["code"]


# -- call ---------------------------------------------------------------------------------------


async def call(args: argparse.Namespace) -> int:
    from .audio.inbound import read_audio_file
    from .caller import SEND_RATE, CallFailed, CallRefused, place_call, write_wav
    from .media.ice import IceConfig, parse_ice_server, use_host_addresses

    use_host_addresses(args.ice_host_address or None)
    audio = read_audio_file(args.input, SEND_RATE)
    persona = {key: value for key, value in (("prompt", args.prompt), ("voice", args.voice)) if value is not None}
    ice = IceConfig(tuple(parse_ice_server(url) for url in args.ice_server)) if args.ice_server else None
    try:
        recording = await place_call(args.url.rstrip("/"), audio, tail_s=args.tail, ice=ice, relay_only=args.relay,
                                     persona=persona or None, token=args.token)
    except CallRefused as refused:
        print(f"the server refused the call: {refused}", file=sys.stderr)
        return 2
    except CallFailed as failed:
        print(f"the call failed: {failed}", file=sys.stderr)
        return 3
    write_wav(args.out, recording.audio)
    summary = recording.summary()
    summary["sent_seconds"] = round(len(audio) / 48000, 3)
    print(json.dumps(summary, indent=2))
    print(f"transcript: {recording.transcript.strip()}")
    return 0


# -- voice-prompt -------------------------------------------------------------------------------


def voice_prompt(args: argparse.Namespace) -> int:
    """Replay the clip through the model once and save what replaying it takes: embeddings and cache."""
    from pathlib import Path

    from .engine.setup import build_stepper
    from .model.persona import save_precomputed_voice
    from .model.persona_step import VoiceOptions
    from .model.source import ModelSource

    clip = Path(args.clip)
    source = ModelSource(model=_first_choice(args), revision=args.revision, moshi_weight=args.moshi_weight,
                         mimi_weight=args.mimi_weight, tokenizer=args.tokenizer, config_path=args.config_path,
                         lora_weight=args.lora_weight)
    from .audio.inbound import read_audio_file

    voices = VoiceOptions(synthetic={clip.stem: read_audio_file(str(clip))},
                          limits=PersonaLimits(max_voice_seconds=args.max_voice_seconds))
    stepper = build_stepper(source, 1, device=args.device, voices=voices)
    save_precomputed_voice(stepper.record_voice(clip.stem), Path(args.out))
    print(f"wrote {args.out}: {clip.stem} for {stepper.info.name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "voice-prompt":
        return voice_prompt(args)
    return asyncio.run(serve(args) if args.command == "serve" else call(args))


if __name__ == "__main__":
    sys.exit(main())
