"""ICE configuration shared by the server's peers and the clients it hands config to.

Static STUN/TURN servers are used as given. TURN URLs with a shared secret get
fresh TURN REST credentials for every peer (see `server.media.turn`). `relay_only`
makes the server's own peer offer relay candidates only (aiortc's
`iceTransportPolicy="relay"`), for deployments where media must go through TURN.

The server's own peer uses STUN/TURN only in relay-only mode (`server_rtc_configuration`).
aiortc gathers every candidate before `setLocalDescription` returns and there is no
trickle from the server to its callers, so every STUN/TURN server the server's peer
uses delays every answer by its round trips, or by 5 s when it does not answer.
With policy `all` its host candidates are enough: a caller who needs TURN gathers
its own relay candidate, and the pair (caller's relay, server's host) connects
whenever TURN can reach the server's address, which policy `all` already requires
of callers' direct paths. A server relay would only add a relay-to-relay pair
(two hops) for a server that nobody can reach, and such a server must run
relay-only anyway. `server_gathers` restores the old behaviour (a server behind
NAT that relies on STUN for a server-reflexive address).

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
from aiortc.rtcicetransport import connection_kwargs, parse_stun_turn_uri

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
class TurnTarget:
    """The one TURN server aiortc would use from a list, with the credentials it would send."""

    url: str
    address: tuple[str, int]
    transport: str  # "udp" or "tcp"
    ssl: bool  # turns:
    username: str | None
    password: str | None


@dataclass(frozen=True)
class IceConfig:
    servers: tuple[IceServer, ...] = field(default_factory=tuple)
    turn_urls: tuple[str, ...] = ()
    turn_secret: str | None = None
    turn_ttl_s: int = 3600
    relay_only: bool = False
    server_gathers: bool = False  # the server's peer uses STUN/TURN with policy `all` too (waits for them)

    def servers_for(self, name: str, now: float | None = None) -> list[IceServer]:
        """The servers one peer should use; TURN with a secret gets credentials for `name` alone."""
        issued = []
        if self.turn_secret and self.turn_urls:
            username, password = turn_rest_credentials(self.turn_secret, name, self.turn_ttl_s, now)
            issued.append(IceServer(self.turn_urls, username, password))
        return issued + list(self.servers)  # aiortc uses the first TURN server it is given

    def rtc_configuration(self, name: str = "moshi-webrtc") -> RTCConfiguration:
        """For a caller's peer: every configured server (aiortc takes the first STUN and first TURN)."""
        policy = RTCIceTransportPolicy.RELAY if self.relay_only else RTCIceTransportPolicy.ALL
        return RTCConfiguration(iceServers=[s.to_rtc() for s in self.servers_for(name)], iceTransportPolicy=policy)

    def server_rtc_configuration(self, name: str) -> RTCConfiguration:
        """For the server's own peer: STUN/TURN only where relay-only needs it (see the module's docstring);
        otherwise an empty list, so its answer never waits on a STUN or TURN server."""
        if self.relay_only or self.server_gathers:
            return self.rtc_configuration(name)
        return RTCConfiguration(iceServers=[], iceTransportPolicy=RTCIceTransportPolicy.ALL)

    def turn_target(self, name: str) -> TurnTarget | None:
        """The TURN server (and credentials for `name`) aiortc would pick from `servers_for(name)`."""
        servers = [s.to_rtc() for s in self.servers_for(name)]
        picked = connection_kwargs(servers)  # aiortc's own choice: the first usable TURN URL
        if "turn_server" not in picked:
            return None
        url = next(u for u in self.urls_for(name) if _is_turn_target(u, picked))
        return TurnTarget(url=url, address=picked["turn_server"], transport=picked["turn_transport"],
                          ssl=picked["turn_ssl"], username=picked["turn_username"], password=picked["turn_password"])

    def validate(self) -> None:
        """Raise ValueError naming the first URL aiortc could not parse (at start-up, not on every call)."""
        for url in self.urls_for():
            try:
                parse_stun_turn_uri(url)
            except ValueError as exc:
                raise ValueError(f"{url!r} is not a STUN/TURN URL aiortc understands: {exc}") from None

    def urls_for(self, name: str = "moshi-webrtc") -> list[str]:
        return [url for server in self.servers_for(name) for url in server.urls]

    def unused_by_aiortc(self) -> list[str]:
        """URLs an aiortc peer (the server's own, `moshi-webrtc call`) ignores: every STUN URL after the
        first, every TURN URL after the first usable one, and `stuns:`. Browsers use them all."""
        picked = connection_kwargs([s.to_rtc() for s in self.servers_for("moshi-webrtc")])
        stun_seen = turn_seen = False
        unused = []
        for url in self.urls_for():
            parsed = parse_stun_turn_uri(url)
            if parsed["scheme"] == "stun" and not stun_seen and picked.get("stun_server") == (
                    parsed["host"], parsed["port"]):
                stun_seen = True
            elif parsed["scheme"] in ("turn", "turns") and not turn_seen and _is_turn_target(url, picked):
                turn_seen = True
            else:
                unused.append(url)
        return unused


def _is_turn_target(url: str, picked: dict) -> bool:
    parsed = parse_stun_turn_uri(url)
    return (parsed["scheme"] in ("turn", "turns") and picked.get("turn_server") == (parsed["host"], parsed["port"])
            and picked.get("turn_transport") == parsed["transport"]
            and picked.get("turn_ssl") == (parsed["scheme"] == "turns"))


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
