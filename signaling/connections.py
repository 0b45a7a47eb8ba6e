"""HTTP connections a stranger cannot hoard: caps on open connections and deadlines on slow or idle ones.

aiohttp alone keeps a connection whose request head never completes open forever, and an idle keep-alive
connection for an hour (its default `keepalive_timeout` is 3630 s), so a few thousand half-open sockets
exhaust the server's file descriptors. `ConnectionGuard` sits on the low-level server's public
`connection_made`/`connection_lost` hooks: it refuses connections past a total and a per-address cap, and
closes any connection that has not delivered a complete request head within `head_timeout_s` of opening or
of its last answer. `read_body` bounds the body the same way. Refusals are counted by reason and logged at
most once per client per minute.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .errors import json_error
from .metrics import RefusalLog

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ConnectionLimits:
    max_connections: int = 512  # all clients together; 0 = no cap
    max_per_address: int = 64  # one TCP peer address; 0 = no cap (behind a trusted reverse proxy: all one address)
    head_timeout_s: float = 10.0  # a complete request head within this long of opening, or of the last answer
    body_timeout_s: float = 10.0  # for `read_body`
    keepalive_timeout_s: float = 15.0  # aiohttp's own idle keep-alive limit (AppRunner)


class BodyRefused(Exception):
    """The request body cannot be taken: answer with `response()`, which says why."""

    status = 400

    def response(self) -> web.Response:
        return json_error(self.status, str(self))


class BodyTimeout(BodyRefused):
    """The request body did not arrive in time: 408, and the connection closes."""

    status = 408

    def response(self) -> web.Response:
        response = super().response()
        response.force_close()
        return response


class BodyTooLarge(BodyRefused):
    """The request body is over the server's limit: 413."""

    status = 413


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    """`request.read()`, but a body that dribbles in raises `BodyTimeout` instead of holding the handler."""
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {timeout_s:g} s") from None


def peer_address(transport: asyncio.BaseTransport) -> str:
    """The peer's IP address (no port): what the per-address cap counts."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "unknown")


class _Connection:
    __slots__ = ("address", "busy", "deadline", "open", "transport")

    def __init__(self, address: str, transport: asyncio.Transport) -> None:
        self.address, self.transport = address, transport
        self.busy = 0  # requests whose handler is running
        self.open = True
        self.deadline: asyncio.TimerHandle | None = None


class ConnectionGuard:
    """Caps and deadlines for an AppRunner's connections; see the module docstring.

    Its `middleware()` must be in the application's middlewares (first, so every request counts as busy)
    before the runner is set up; then `install(runner)`. Connections the guard never saw pass untouched.
    """

    def __init__(self, limits: ConnectionLimits, on_refused: Callable[[str], None] | None = None) -> None:
        self.limits = limits
        self.on_refused = on_refused
        self.refused: dict[str, int] = {}
        self._by_handler: dict[object, _Connection] = {}  # aiohttp's RequestHandler: one per connection
        self._per_address: dict[str, int] = {}
        self._log = RefusalLog(logger=log)

    @property
    def open_connections(self) -> int:
        return len(self._by_handler)

    def open_by_address(self) -> dict[str, int]:
        return dict(self._per_address)

    def install(self, runner: web.AppRunner) -> None:
        """Wrap the set-up runner's server hooks (instance attributes: aiohttp itself is left alone)."""
        server = runner.server
        if server is None:
            raise RuntimeError("install the guard after `await runner.setup()`")
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self._connected(handler, transport)

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            try:
                lost(handler, exc)
            finally:
                self._disconnected(handler)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def middleware(self) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
        """Marks the connection busy while a handler runs (no deadline), and re-arms the deadline after."""

        @web.middleware
        async def guard_connection(request: web.Request, handler: Handler) -> web.StreamResponse:
            connection = self._by_handler.get(request.protocol)  # the connection's RequestHandler
            if connection is None:
                return await handler(request)
            connection.busy += 1
            self._disarm(connection)
            try:
                return await handler(request)
            finally:
                connection.busy -= 1
                if connection.busy == 0 and connection.open:
                    self._arm(connection)

        return guard_connection

    def _connected(self, handler: object, transport: asyncio.Transport) -> None:
        address = peer_address(transport)
        limits = self.limits
        if limits.max_connections and self.open_connections >= limits.max_connections:
            self._refuse(transport, address, "connections", f"{limits.max_connections} connections are open",
                         on_connect=True)
            return
        if limits.max_per_address and self._per_address.get(address, 0) >= limits.max_per_address:
            self._refuse(transport, address, "connections_per_client",
                         f"{limits.max_per_address} connections from this address are open", on_connect=True)
            return
        connection = _Connection(address, transport)
        self._by_handler[handler] = connection
        self._per_address[address] = self._per_address.get(address, 0) + 1
        self._arm(connection)

    def _disconnected(self, handler: object) -> None:
        connection = self._by_handler.pop(handler, None)
        if connection is None:
            return  # refused, or never seen
        connection.open = False
        self._disarm(connection)
        left = self._per_address[connection.address] - 1
        if left:
            self._per_address[connection.address] = left
        else:
            del self._per_address[connection.address]

    def _arm(self, connection: _Connection) -> None:
        self._disarm(connection)
        loop = asyncio.get_running_loop()
        connection.deadline = loop.call_later(self.limits.head_timeout_s, self._deadline, connection)

    @staticmethod
    def _disarm(connection: _Connection) -> None:
        if connection.deadline is not None:
            connection.deadline.cancel()
            connection.deadline = None

    def _deadline(self, connection: _Connection) -> None:
        connection.deadline = None
        if connection.busy or not connection.open:
            return
        self._refuse(connection.transport, connection.address, "head_timeout",
                     f"no complete request head within {self.limits.head_timeout_s:g} s")

    def _refuse(self, transport: asyncio.Transport, address: str, reason: str, why: str,
                on_connect: bool = False) -> None:
        """Count, log (once per address per minute), and drop the connection without a goodbye."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        if self.on_refused is not None:
            self.on_refused(reason)
        self._log.note(address, reason, why)
        if not on_connect:
            transport.abort()
            return
        # Not one byte is read, but the abort waits two loop turns: on Python 3.11 aiohttp's RequestHandler.start
        # task is scheduled after this hook, and a connection lost before its first step trips its assertion.
        transport.pause_reading()
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, transport.abort)


async def start_guarded_runner(app: web.Application, guard: ConnectionGuard) -> web.AppRunner:
    """A set-up AppRunner with `guard` installed; add a site to it. The guard's `middleware()` must be in
    `app`'s middlewares (they are fixed once the app is built): without it a request does not pause the head
    deadline, and a handler running past `head_timeout_s` is cut off."""
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=guard.limits.keepalive_timeout_s)
    await runner.setup()
    guard.install(runner)
    return runner
