"""Pinned to aioice 0.13's private parts: follow a caller who moves, and restart ICE.

What aioice does not do, measured on loopback (issue #23):
- The controlled side (the server: the caller offers) sends on the pair nominated last, and changes it only
  when a check carrying USE-CANDIDATE succeeds. Chromium renominates after its address changes; an aiortc
  caller never does, so after a NAT rebinding the server heard the caller at its new address and kept
  sending to the old one until consent expired (about 30 s) and the call ended as `ice_failed`.
- There is no ICE restart: the agent's credentials are fixed at creation.

`PathFollower` watches where the caller's packets come from. When they come from an address other than the
path's while the path itself has gone quiet, it sends that address an ICE check (signed with the caller's
password, so only the caller can answer it) and, on a valid answer, sends on that path: consent (RFC 7675)
is exactly that answer. Probes are few (one per address per half second, four a second per call), so a
stranger who spoofs source addresses gets a trickle of small packets reflected, not a flood.

`restart_ice` gives the agent new local credentials and the caller's new ones (RFC 8445 section 9): the
nominated pair keeps carrying media (and DTLS/SRTP with it) until a check under the new credentials
nominates a pair again.

Everything here reads or writes aioice's private attributes; `check_version` refuses another aioice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version

from aioice import Candidate, Connection, stun
from aioice.candidate import candidate_priority
from aioice.ice import CandidatePair, StunProtocol
from aioice.utils import random_string
from aiortc import RTCIceCandidate, RTCPeerConnection
from aiortc.rtcicetransport import candidate_to_aioice

log = logging.getLogger(__name__)

PINNED_AIOICE = "0.13."
QUIET_BEFORE_PROBE_S = 0.2  # the path heard nothing this long while another address sends: look at that one
PROBE_EVERY_S = 0.5  # per address
PROBES_PER_S = 4  # per call, all addresses
PROBE_RETRANSMISSIONS = 2  # answers within 1.5 s (STUN's RTO of 0.5 s, doubled): a moved phone is near
ADDRESSES_KEPT = 8


class AioiceChanged(RuntimeError):
    """The installed aioice is not the one this module was written against."""


def check_version() -> None:
    installed = version("aioice")
    if not installed.startswith(PINNED_AIOICE):
        raise AioiceChanged(f"server.media.ice_compat is written against aioice {PINNED_AIOICE}x, found {installed}: "
                            "check its private attributes (Connection._nominated, _protocols, _check_list) again")


def ice_connection(pc: RTCPeerConnection) -> Connection | None:
    """The aioice agent under a peer connection's (bundled) transport, once the offer is applied."""
    for transceiver in pc.getTransceivers():
        dtls = transceiver.receiver.transport
        if dtls is not None:
            return dtls.transport._connection
    if pc.sctp is not None:
        return pc.sctp.transport.transport._connection
    return None


def nominated_candidate_types(pc: RTCPeerConnection) -> set[str] | None:
    """The candidate types ("host", "srflx", "prflx", "relay") of the ICE pair carrying RTP, if known."""
    connection = ice_connection(pc)
    pair = connection._nominated.get(1) if connection is not None else None  # component 1: RTP
    return {pair.local_candidate.type, pair.remote_candidate.type} if pair is not None else None


@dataclass(frozen=True)
class PathSwitch:
    """The server began sending to `new` instead of `old`."""

    how: str  # "followed" (we probed the caller's new address), "renominated" (by the caller), "restart"
    old: tuple[str, int]
    new: tuple[str, int]
    quiet_s: float  # how long nothing had come over the old path when the switch happened


class PathFollower:
    """Keeps the server's media on the path the caller is reachable on (see the module's notes)."""

    def __init__(self, connection: Connection, on_switch: Callable[[PathSwitch], None],
                 clock: Callable[[], float] = time.monotonic):
        self.connection = connection
        self.on_switch = on_switch
        self.clock = clock
        self.probes = 0
        self.restarting = False  # a restart is under way: the next nomination is its outcome
        self._heard: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._probed_at: dict[tuple[str, int], float] = {}
        self._recent_probes: deque[float] = deque(maxlen=PROBES_PER_S)
        self._probing: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Task] = set()
        self._nominated_at = clock()
        for protocol in connection._protocols:
            self._listen(protocol)
        original_check_complete = connection.check_complete

        def check_complete(pair: CandidatePair) -> None:
            before = connection._nominated.get(pair.component)
            original_check_complete(pair)
            if pair.nominated and connection._nominated.get(pair.component) is pair:
                self._nominated(before, pair)

        connection.check_complete = check_complete

    def close(self) -> None:
        """Stop following: the agent's own methods back, and no reference from it to the call (aioice's log
        records name the agent, and a log handler that keeps records would keep the whole call alive)."""
        for task in self._tasks:
            task.cancel()
        self.connection.__dict__.pop("check_complete", None)
        for protocol in self.connection._protocols:
            protocol.__dict__.pop("datagram_received", None)
        self.on_switch = _ignore_switch

    # -- where the caller is heard --------------------------------------------------------------

    def _listen(self, protocol: StunProtocol) -> None:
        received = protocol.datagram_received

        def datagram_received(data: bytes | str, addr: tuple) -> None:
            received(data, addr)
            self._heard_from(protocol, (addr[0], addr[1]))

        protocol.datagram_received = datagram_received

    def _heard_from(self, protocol: StunProtocol, addr: tuple[str, int]) -> None:
        now = self.clock()
        self._heard[addr] = now
        self._heard.move_to_end(addr)
        while len(self._heard) > ADDRESSES_KEPT:
            self._heard.popitem(last=False)
        current = self.connection._nominated.get(protocol.local_candidate.component)
        if current is None or self.connection._closing or current.remote_addr == addr:
            return
        if now - self.last_heard(current.remote_addr) < QUIET_BEFORE_PROBE_S:
            return  # the path is alive: another address is someone else, or the caller's second path
        self._probe(protocol, addr, now)

    def last_heard(self, addr: tuple[str, int]) -> float:
        """When something last came from `addr` (or when its path was nominated, if nothing came since)."""
        return max(self._heard.get(addr, self._nominated_at), self._nominated_at)

    # -- probing a new address ------------------------------------------------------------------

    def _probe(self, protocol: StunProtocol, addr: tuple[str, int], now: float) -> None:
        if addr in self._probing or now - self._probed_at.get(addr, -PROBE_EVERY_S) < PROBE_EVERY_S:
            return
        if len(self._recent_probes) == PROBES_PER_S and now - self._recent_probes[0] < 1.0:
            return
        if self.connection.remote_password is None:
            return
        self._probed_at[addr] = now
        if len(self._probed_at) > 4 * ADDRESSES_KEPT:
            self._probed_at.pop(next(iter(self._probed_at)))
        self._recent_probes.append(now)
        self._probing.add(addr)
        self.probes += 1
        task = asyncio.get_running_loop().create_task(self._check(protocol, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check(self, protocol: StunProtocol, addr: tuple[str, int]) -> None:
        connection = self.connection
        component = protocol.local_candidate.component
        try:
            candidate = self._remote_candidate(component, addr)
            pair = connection._find_pair(protocol, candidate) or CandidatePair(protocol, candidate)
            request = connection.build_request(pair, nominate=False)
            try:
                _, source = await protocol.request(request, addr, integrity_key=connection.remote_password.encode(),
                                                   retransmissions=PROBE_RETRANSMISSIONS)
            except stun.TransactionError:
                return  # not the caller, or not reachable that way
            if (source[0], source[1]) != addr or connection._closing:
                return
            current = connection._nominated.get(component)
            if current is not None and self.clock() - self.last_heard(current.remote_addr) < QUIET_BEFORE_PROBE_S:
                return  # the old path came back meanwhile
            if candidate not in connection._remote_candidates:
                connection._remote_candidates.append(candidate)
            if pair not in connection._check_list:
                connection._check_list.append(pair)
            pair.state = CandidatePair.State.SUCCEEDED
            pair.nominated = True
            connection._nominated[component] = pair
            self._nominated(current, pair, how="followed")
        finally:
            self._probing.discard(addr)

    def _remote_candidate(self, component: int, addr: tuple[str, int]) -> Candidate:
        for candidate in self.connection._remote_candidates:
            if candidate.component == component and (candidate._network_host, candidate.port) == addr:
                return candidate
        candidate = Candidate(foundation=random_string(10), component=component, transport="udp",
                              priority=candidate_priority(component, "prflx"), host=addr[0], port=addr[1],
                              type="prflx")
        candidate._network_host = addr[0]
        return candidate

    def _nominated(self, before: CandidatePair | None, after: CandidatePair, how: str | None = None) -> None:
        """`after` was nominated and carries the media now: tell, if it changed the path or ended a restart."""
        if after is before and not self.restarting:
            return
        if how is None:
            how = "restart" if self.restarting else "renominated"
        self.restarting = False
        now = self.clock()
        old = before.remote_addr if before is not None else after.remote_addr
        quiet_s = now - self.last_heard(old) if before is not None else 0.0
        self._nominated_at = now
        if before is None:
            return  # the first nomination: the call connecting, not a switch
        log.info("ICE path %s: %s -> %s (the old path quiet %.2f s)", how, old, after.remote_addr, quiet_s)
        self.on_switch(PathSwitch(how=how, old=old, new=after.remote_addr, quiet_s=quiet_s))


def _ignore_switch(switch: PathSwitch) -> None:
    pass


def follow_caller(pc: RTCPeerConnection, on_switch: Callable[[PathSwitch], None]) -> PathFollower | None:
    """Start following the caller of `pc` (after its answer is made: the sockets exist then)."""
    check_version()
    connection = ice_connection(pc)
    return PathFollower(connection, on_switch) if connection is not None else None


@dataclass(frozen=True)
class IceCredentials:
    ufrag: str
    pwd: str


def restart_ice(follower: PathFollower, remote: IceCredentials, candidates: list[Candidate]) -> IceCredentials:
    """Restart ICE (RFC 8445 section 9) as the controlled side: new credentials on both sides, every pair
    to be checked again; the nominated pair carries media until the caller nominates one under the new
    credentials. Returns the server's new credentials, for the answer."""
    connection = follower.connection
    local = IceCredentials(ufrag=random_string(8), pwd=random_string(24))
    connection._local_username, connection._local_password = local.ufrag, local.pwd
    connection.remote_username, connection.remote_password = remote.ufrag, remote.pwd
    for pair in connection._check_list:
        if pair.task is not None:
            pair.task.cancel()
            pair.task = None
        pair.state = CandidatePair.State.FROZEN
        pair.nominated = pair.remote_nominated = False
    for candidate in candidates:
        if candidate.host.endswith(".local"):
            continue  # an mDNS name: the caller's checks make it known as peer-reflexive instead
        connection._add_remote_candidate(candidate, candidate.host)
    follower.restarting = True
    return local


def add_remote_candidate(follower: PathFollower, candidate: RTCIceCandidate) -> None:
    """A candidate trickled after an ICE restart (aiortc's transport took end-of-candidates long before)."""
    if candidate.ip.endswith(".local") or candidate.component != 1:
        return
    follower.connection._add_remote_candidate(candidate_to_aioice(candidate), candidate.ip)
