"""A media worker process: WebRTC peers, receive and send paths, and its own HTTP side for its calls.

The worker runs the same signaling service and call sessions as a one-process
server, with `RemoteEngine` in place of the engine. It listens on a private
loopback port that only the front process forwards to (the public guards,
token, CORS and offer limits, run there). Its session ids start with
`w<index>.`, so the front knows which worker holds a call from the id alone.
It ends on SIGTERM (hanging its calls up) or when the engine process goes
away (its calls end with that reason, and it exits with status 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import sys

EXIT_ENGINE_LOST = 1


def worker_main(index: int, engine_path: str, config, host_addresses: list[str] | None, log_level: str) -> None:
    """Process entry (spawned): serve until told to stop or the engine goes."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s worker{index} %(name)s: %(message)s")
    sys.exit(asyncio.run(_serve(index, engine_path, config, host_addresses)))


async def _serve(index: int, engine_path: str, config, host_addresses: list[str] | None) -> int:
    from aiohttp import web

    from signaling.app import SERVER_RESTART, SignalingService

    from .engine.remote import RemoteEngine
    from .media.ice import use_host_addresses
    from .media.workers import session_prefix

    use_host_addresses(host_addresses)
    config = dataclasses.replace(config, session_id_prefix=config.session_id_prefix + session_prefix(index),
                                 api_token=None, cors_origins=(), max_offers_per_minute=0,
                                 turn_check_interval_s=None,  # the front checks TURN
                                 trust_forwarded_for=True)  # the front says who calls, for the per-client share
    engine = RemoteEngine(engine_path)
    service = SignalingService(engine, config)
    runner = web.AppRunner(service.app(), access_log=None)
    await runner.setup()
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    await web.SockSite(runner, listening).start()

    stop = asyncio.Event()
    outcome = {"code": 0}

    def engine_lost() -> None:
        outcome["code"] = EXIT_ENGINE_LOST
        stop.set()

    engine.engine_lost.append(engine_lost)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await engine.connect(index, port)
    await stop.wait()
    if outcome["code"] == EXIT_ENGINE_LOST:
        logging.getLogger(__name__).error("the engine process went away: ending %d call(s)", len(service.sessions))
        await service.end_all_calls("the model engine stopped", kind="engine_lost")
    else:  # the front stops (after its drain, if it had one): the calls still here end as a restart
        await service.end_all_calls(SERVER_RESTART, kind=SERVER_RESTART)
    await runner.cleanup()
    engine.close()
    return outcome["code"]
