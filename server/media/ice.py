"""ICE configuration shared by the server's peers and the clients it hands config to.

Static STUN/TURN servers are used as given. TURN URLs with a shared secret get
fresh TURN REST credentials for every peer (see `server.media.turn`). `relay_only`
makes the server's own peer offer relay candidates only (aiortc's
`iceTransportPolicy="relay"`), for deployments where media must go through TURN.

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
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from .turn import turn_rest_credentials

_original_host_addresses = aioice.ice.get_host_addresses


@dataclass(frozen=True)
class IceServer:
    """A STUN or TURN server, as configured by the operator."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None

    def to_rtc(self) -> RTCIceServer:
        return RTCIceServer(urls=list(self.urls), username=self.username, credential=self.credential)

    @classmethod
    def from_json(cls, data: dict) -> IceServer:
        urls = data["urls"]
        return cls(tuple([urls] if isinstance(urls, str) else urls), data.get("username"), data.get("credential"))

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
    turn_urls: tuple[str, ...] = ()
    turn_secret: str | None = None
    turn_ttl_s: int = 3600
    relay_only: bool = False

    def servers_for(self, name: str, now: float | None = None) -> list[IceServer]:
        """The servers one peer should use; TURN with a secret gets credentials for `name` alone."""
        issued = []
        if self.turn_secret and self.turn_urls:
            username, password = turn_rest_credentials(self.turn_secret, name, self.turn_ttl_s, now)
            issued.append(IceServer(self.turn_urls, username, password))
        return issued + list(self.servers)  # aiortc uses the first TURN server it is given

    def rtc_configuration(self, name: str = "moshi-webrtc") -> RTCConfiguration:
        policy = RTCIceTransportPolicy.RELAY if self.relay_only else RTCIceTransportPolicy.ALL
        return RTCConfiguration(iceServers=[s.to_rtc() for s in self.servers_for(name)], iceTransportPolicy=policy)


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
