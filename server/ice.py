"""ICE configuration shared by the server's peers and the clients it hands config to.

Two aiortc defaults matter here:
- With no `iceServers`, aiortc quietly adds Google's public STUN server. We
  always pass an explicit list (empty unless configured), so the server never
  talks to a host nobody chose.
- aioice offers a host candidate for every local address except 127.0.0.1.
  `use_host_addresses` pins the addresses it offers: operators pick the
  interface that faces their callers, and tests pin loopback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer

_original_host_addresses = aioice.ice.get_host_addresses


@dataclass(frozen=True)
class IceServer:
    """A STUN or TURN server, as configured by the operator."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None

    def to_rtc(self) -> RTCIceServer:
        return RTCIceServer(urls=list(self.urls), username=self.username, credential=self.credential)

    def to_json(self) -> dict:
        out: dict = {"urls": list(self.urls)}
        if self.username is not None:
            out["username"] = self.username
        if self.credential is not None:
            out["credential"] = self.credential
        return out


@dataclass(frozen=True)
class IceConfig:
    servers: tuple[IceServer, ...] = field(default_factory=tuple)

    def rtc_configuration(self) -> RTCConfiguration:
        return RTCConfiguration(iceServers=[server.to_rtc() for server in self.servers])


def parse_ice_server(spec: str) -> IceServer:
    """`stun:host:port` or `turn:user:pass@host:port?transport=udp` style, from the command line."""
    scheme, _, rest = spec.partition(":")
    if scheme not in ("stun", "stuns", "turn", "turns") or not rest:
        raise ValueError(f"an ICE server URL starts with stun:, stuns:, turn: or turns:, got {spec!r}")
    if "@" in rest:
        credentials, _, address = rest.rpartition("@")
        username, _, password = credentials.partition(":")
        return IceServer((f"{scheme}:{address}",), username or None, password or None)
    return IceServer((spec,))


def use_host_addresses(addresses: Sequence[str] | None) -> None:
    """Offer host candidates only on these local addresses (None: aioice's default, every interface)."""
    if not addresses:
        aioice.ice.get_host_addresses = _original_host_addresses
        return
    pinned = list(addresses)

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in pinned if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = host_addresses
