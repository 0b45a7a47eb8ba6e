"""WHIP (RFC 9725): the standard HTTP signaling any WebRTC client library can speak.

    OPTIONS /whip               204, Accept-Post: application/sdp (and nothing else: no ICE servers, whose
                                TURN credentials go out with the 201 answer only, as RFC 9725 does)
    POST    /whip               application/sdp offer -> 201 Created, Location: /whip/{id},
                                the answer SDP, ETag, and Link: <url>; rel="ice-server" headers
    PATCH   /whip/{id}          application/trickle-ice-sdpfrag: the client's trickled candidates -> 204;
                                an ICE restart (new ice-ufrag/ice-pwd, RFC 9725 section 4.3.2) -> 200 with the
                                server's new credentials and candidates as a trickle-ice-sdpfrag, and a new ETag
    DELETE  /whip/{id}          ends the call -> 200

A persona goes in the query: `POST /whip?prompt=...&voice=...` (PersonaPlex-style models).
With an API token set (signaling.guards), every request but a CORS preflight needs `Authorization: Bearer <token>`.
A client that offers a data channel labelled `events` gets the model's text on it,
exactly as with `POST /offer`. Calls made here are the same sessions as /offer's.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import TYPE_CHECKING

from aiohttp import web
from aiortc import RTCIceCandidate, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp

from server.media.handover import MoveRefused
from server.media.ice_restart import restart_fragment, sdp_ice_credentials
from server.model.persona import Persona

from .connections import BodyRefused
from .errors import SessionRefused, json_error
from .offer_check import OfferRejected, check_offer_sdp

if TYPE_CHECKING:
    from .app import SignalingService

log = logging.getLogger(__name__)

SDP = "application/sdp"
SDPFRAG = "application/trickle-ice-sdpfrag"
MAX_PATCHES_PER_CALL = 20  # a client trickles as it gathers: a handful of requests
MAX_PATCH_CANDIDATES = 32  # per request
MAX_TRICKLED_CANDIDATES = 32  # per call, beside the offer's own (signaling.offer_check.MAX_OFFER_CANDIDATES)


async def whip_options(request: web.Request) -> web.StreamResponse:
    """`OPTIONS /whip`, the same whether calls run here or in media workers (the front answers it itself)."""
    return web.Response(status=204, headers={"Accept-Post": SDP})


class TrickleRejected(ValueError):
    """A trickled fragment the server does not take; the message says why."""


def _trickled_candidates(fragment: str, mids: set[str]) -> list[RTCIceCandidate]:
    """The candidates of a trickle-ice-sdpfrag, each checked: it parses, names a media section of the offer
    (a=mid before it), an IP address (or an mDNS .local name), a port, UDP or TCP; at most
    MAX_PATCH_CANDIDATES of them."""
    mid = None
    candidates = []
    for line in fragment.splitlines():
        line = line.strip()
        if line.startswith("a=mid:"):
            mid = line[len("a=mid:"):]
        elif line.startswith("a=candidate:"):
            if len(candidates) == MAX_PATCH_CANDIDATES:
                raise TrickleRejected(f"at most {MAX_PATCH_CANDIDATES} candidates a PATCH")
            try:
                candidate = candidate_from_sdp(line[len("a=candidate:"):])
            except (ValueError, IndexError, AssertionError) as exc:  # aiortc asserts on too few fields
                raise TrickleRejected(f"a candidate does not parse: {line[:200]!r} ({exc})") from None
            if mid is None or mid not in mids:
                raise TrickleRejected(f"a candidate must follow an a=mid line naming a section of the offer "
                                      f"({', '.join(sorted(mids))}); got {mid!r}")
            if not _is_address(candidate.ip) or not 0 < candidate.port < 65536:
                raise TrickleRejected(f"a candidate's address is not an IP address and port: {line[:200]!r}")
            if candidate.protocol.lower() not in ("udp", "tcp") or candidate.component not in (1, 2):
                raise TrickleRejected(f"a candidate must be UDP or TCP, component 1 or 2: {line[:200]!r}")
            candidate.sdpMid = mid
            candidates.append(candidate)
    return candidates


def _is_address(host: str) -> bool:
    if host.endswith(".local") and 0 < len(host) <= 253:
        return True  # an mDNS name, as browsers hide host addresses behind
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class WhipEndpoint:
    def __init__(self, service: SignalingService):
        self.service = service

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("OPTIONS", "/whip", whip_options)
        app.router.add_post("/whip", self.post)
        app.router.add_route("PATCH", "/whip/{session_id}", self.patch)
        app.router.add_delete("/whip/{session_id}", self.delete)

    # -- helpers ------------------------------------------------------------------------------

    def _ice_links(self) -> list[str]:
        links = []
        for server in self.service.config.ice.servers_for("whip-client"):
            for url in server.urls:
                link = f'<{url}>; rel="ice-server"'
                if server.username is not None:
                    link += f'; username="{server.username}"; credential="{server.credential}"'
                    link += '; credential-type="password"'
                links.append(link)
        return links

    def _with_links(self, response: web.StreamResponse) -> web.StreamResponse:
        for link in self._ice_links():
            response.headers.add("Link", link)
        return response

    # -- handlers -----------------------------------------------------------------------------

    async def post(self, request: web.Request) -> web.StreamResponse:
        if request.content_type != SDP:
            return json_error(415, f"a WHIP offer must be {SDP}, got {request.content_type or 'no content type'}")
        try:
            sdp = (await self.service.read_body(request)).decode()
        except BodyRefused as exc:
            return exc.response()
        except UnicodeDecodeError:
            return json_error(400, "the offer is not UTF-8 text")
        try:
            check_offer_sdp(sdp)
        except OfferRejected as rejected:
            self.service.metrics.rejected("bad_offer", self.service.client(request), rejected.message)
            return json_error(rejected.status, rejected.message)
        try:
            session, answer = await self.service.start_session(
                RTCSessionDescription(sdp=sdp, type="offer"), Persona.from_query(dict(request.query)),
                self.service.client(request))
        except SessionRefused as refused:
            return refused.response()
        response = web.Response(
            status=201,
            body=answer.sdp.encode(),
            content_type=SDP,
            headers={"Location": self.service.session_url("whip", session.session_id),
                     "ETag": f'"{session.session_id}"'},
        )
        return self._with_links(response)

    async def patch(self, request: web.Request) -> web.Response:
        session = self.service.sessions.get(request.match_info["session_id"])
        if session is None:
            return json_error(404, "no such WHIP session (it may have ended already)")
        if request.content_type != SDPFRAG:
            return json_error(415, f"a WHIP PATCH must be {SDPFRAG}, got {request.content_type or 'no content type'}")
        if session.trickle_requests >= MAX_PATCHES_PER_CALL:
            self.service.metrics.rejected("trickle_limit", self.service.client(request), "trickle PATCH requests")
            return json_error(429, f"at most {MAX_PATCHES_PER_CALL} trickle PATCH requests a call")
        session.trickle_requests += 1
        try:
            fragment = (await self.service.read_body(request)).decode(errors="replace")
        except BodyRefused as exc:
            return exc.response()
        ufrag, pwd = sdp_ice_credentials(fragment)
        current = session.remote_ice_credentials
        if (ufrag and ufrag != current[0]) or (pwd and pwd != current[1]):
            return await self._restart_ice(request, session, fragment)
        try:
            candidates = _trickled_candidates(fragment, set(re.findall(r"^a=mid:(\S+)", session.remote_sdp, re.M)))
        except TrickleRejected as rejected:
            self.service.metrics.rejected("bad_trickle", self.service.client(request), str(rejected))
            return json_error(400, str(rejected))
        if session.trickled_candidates + len(candidates) > MAX_TRICKLED_CANDIDATES:
            self.service.metrics.rejected("trickle_limit", self.service.client(request), "trickled candidates")
            return json_error(400, f"at most {MAX_TRICKLED_CANDIDATES} candidates may be trickled to a call")
        for candidate in candidates:
            try:
                await session.add_remote_candidate(candidate)
            except Exception as exc:  # noqa: BLE001 - whatever aiortc makes of it, the caller hears why
                self.service.metrics.rejected("bad_trickle", self.service.client(request), str(exc))
                return json_error(400, f"a candidate was refused: {type(exc).__name__}: {exc}")
        log.info("whip session %s: %d trickled candidates", session.session_id, len(candidates))
        return web.Response(status=204)

    async def _restart_ice(self, request: web.Request, session, fragment: str) -> web.Response:
        """RFC 9725 section 4.3.2: the client's new credentials (and candidates) in, the server's out."""
        try:
            answer = await session.restart_ice(fragment, fragment=True)
        except MoveRefused as refused:
            self.service.metrics.rejected("bad_trickle", self.service.client(request), refused.message)
            return json_error(refused.status, refused.message)
        return web.Response(status=200, text=restart_fragment(answer), content_type=SDPFRAG,
                            headers={"ETag": f'"{session.session_id}.{session.ice_restart_requests}"'})

    async def delete(self, request: web.Request) -> web.Response:
        session = self.service.sessions.get(request.match_info["session_id"])
        if session is None:
            return json_error(404, "no such WHIP session (it may have ended already)")
        await session.hang_up("hung up (WHIP DELETE)", kind="hung_up")
        return web.Response(status=200)
