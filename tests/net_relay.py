"""A userspace UDP relay on 127.0.0.1 that impairs a call's media (tc/netem is not available here).

    caller  <-->  relay port A  |  relay port B  <-->  server

The caller's offer goes out without its candidates and the server's answer
is rewritten to name port A, so every packet of the call crosses the relay;
the server learns the caller as a peer-reflexive candidate at port B. Only
media packets (RTP, not RTCP, STUN or DTLS) are impaired, per direction:
`up` is caller -> server, `down` server -> caller. A rule sees each media
packet's index (0, 1, ...) in its direction and returns the extra delay in
seconds, or None to drop it. A rule that models a longer path says so in a
`path_delay_s` attribute: the other packets (RTCP, STUN, DTLS) are delayed by
that much, never lost, so round-trip times measured over RTCP see the path as
they would on a real network.

A network change is `rebind()`: the server-facing socket is replaced by one on a new port (a NAT that
rebinds), the old one closed, so the old path is dead. `move_caller_side()` does the same on the caller's
side (a phone whose Wi-Fi gave way to cellular): the caller reaches the server only through a port that a
later answer (`answer()`, as after an ICE restart or a resume) names. An outage
is `cut()` ... `restore()`: every datagram either way is dropped meanwhile (STUN and DTLS too).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass, field

Rule = Callable[[int], float | None]


def clean(index: int) -> float | None:
    return 0.0


def lose(*indices: int) -> Rule:
    lost = set(indices)
    return lambda index: None if index in lost else 0.0


def is_media(datagram: bytes) -> bool:
    """RTP (RFC 7983: first byte 128-191) and not RTCP (payload types 192-223 in the second byte)."""
    return len(datagram) >= 12 and 128 <= datagram[0] <= 191 and not 192 <= datagram[1] <= 223


@dataclass
class Direction:
    rule: Rule = clean
    media: int = 0
    dropped: int = 0
    log: list[int] = field(default_factory=list)  # indices of the media packets dropped


class _Side(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, tuple], None]):
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.on_datagram(data, addr)


class UdpRelay:
    """Start it, pass it to `place_call(..., sdp=relay)`, read its counters, close it."""

    def __init__(self, up: Rule = clean, down: Rule = clean):
        self.up, self.down = Direction(up), Direction(down)
        self.server_address: tuple[str, int] | None = None
        self.caller_address: tuple | None = None
        self._caller_side: _Side | None = None
        self._server_side: _Side | None = None
        self._loop = asyncio.get_event_loop()
        self.cut_off = False
        self.rebinds = 0
        self.datagrams_after_cut = 0  # datagrams dropped by cut()

    async def start(self) -> UdpRelay:
        loop = asyncio.get_running_loop()
        self._loop = loop
        _, self._caller_side = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_caller), local_addr=("127.0.0.1", 0))
        _, self._server_side = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_server), local_addr=("127.0.0.1", 0))
        return self

    async def rebind(self) -> int:
        """Move the server-facing side to a new port, closing the old one; returns the new port."""
        self._server_side = await self._moved(self._server_side, self._from_server)
        return self.server_side_port

    async def move_caller_side(self) -> int:
        """Move the caller-facing side to a new port, closing the old one; returns the new port."""
        self._caller_side = await self._moved(self._caller_side, self._from_caller)
        self.caller_address = None  # the server reaches the caller again once it sends from the new path
        return self.caller_port

    async def _moved(self, old: _Side | None, on_datagram: Callable[[bytes, tuple], None]) -> _Side:
        _, side = await self._loop.create_datagram_endpoint(lambda: _Side(on_datagram), local_addr=("127.0.0.1", 0))
        if old is not None and old.transport is not None:
            old.transport.close()
        self.rebinds += 1
        return side

    @property
    def server_side_port(self) -> int:
        return self._server_side.transport.get_extra_info("sockname")[1]

    def cut(self) -> None:
        """Drop every datagram, both ways, until `restore()`."""
        self.cut_off = True

    def restore(self) -> None:
        self.cut_off = False

    @property
    def caller_port(self) -> int:
        return self._caller_side.transport.get_extra_info("sockname")[1]

    def close(self) -> None:
        for side in (self._caller_side, self._server_side):
            if side is not None and side.transport is not None:
                side.transport.close()

    # -- SDP ----------------------------------------------------------------------------------

    def offer(self, sdp: str) -> str:
        """The caller's offer without its candidates: the server may only learn the caller via the relay.
        `end-of-candidates` goes too, or aioice would drop the component that has no candidate."""
        return "".join(line for line in sdp.splitlines(keepends=True)
                       if not line.startswith(("a=candidate:", "a=end-of-candidates")))

    def answer(self, sdp: str) -> str:
        """The server's answer with its one loopback host candidate moved to the relay's caller-facing port."""
        match = re.search(r"a=candidate:\S+ 1 udp \d+ 127\.0\.0\.1 (\d+) typ host", sdp)
        if match is None:
            raise ValueError("the answer has no 127.0.0.1 host candidate to route through the relay")
        port = match.group(1)
        self.server_address = ("127.0.0.1", int(port))
        return re.sub(rf"127\.0\.0\.1 {port} typ host", f"127.0.0.1 {self.caller_port} typ host", sdp)

    # -- datagrams ----------------------------------------------------------------------------

    def _from_caller(self, data: bytes, addr: tuple) -> None:
        self.caller_address = addr
        if self.server_address is not None:
            self._pass(self.up, data, self._server_side, self.server_address)

    def _from_server(self, data: bytes, addr: tuple) -> None:
        if self.caller_address is not None:
            self._pass(self.down, data, self._caller_side, self.caller_address)

    def _pass(self, direction: Direction, data: bytes, side: _Side, to: tuple) -> None:
        if self.cut_off:
            self.datagrams_after_cut += 1
            return
        delay = getattr(direction.rule, "path_delay_s", 0.0)
        if is_media(data):
            index = direction.media
            direction.media += 1
            delay = direction.rule(index)
            if delay is None:
                direction.dropped += 1
                direction.log.append(index)
                return
        if delay > 0:
            self._loop.call_later(delay, side.transport.sendto, data, to)
        else:
            side.transport.sendto(data, to)
