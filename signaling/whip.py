"""WHIP (RFC 9725): the standard HTTP signaling any WebRTC client library can speak.

    OPTIONS /whip               204, Accept-Post: application/sdp (and nothing else: no ICE servers, whose
                                TURN credentials go out with the 201 answer only, as RFC 9725 does)
    POST    /whip               application/sdp offer -> 201 Created, Location: /whip/{id},
                                the answer SDP, ETag, and Link: <url>; rel="ice-server" headers
    PATCH   /whip/{id}          application/trickle-ice-sdpfrag: the client's trickled candidates -> 204;
                                an ICE restart (new ufrag/pwd) -> 422, as this server does not restart ICE
    DELETE  /whip/{id}          ends the call -> 200

A persona goes in the query: `POST /whip?prompt=...&voice=...` (PersonaPlex-style models).
With an API token set (signaling.guards), every request but a CORS preflight needs `Authorization: Bearer <token>`.
A client that offers a data channel labelled `events` gets the model's text on it,
exactly as with `POST /offer`. Calls made here are the same sessions as /offer's.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from aiohttp import web
from aiortc import RTCSessionDescription
from aiortc.sdp import candidate_from_sdp

from server.model.persona import Persona

from .errors import SessionRefused, json_error
from .offer_check import MAX_BODY_BYTES, OfferRejected, check_offer_sdp

if TYPE_CHECKING:
    from .app import SignalingService

log = logging.getLogger(__name__)

SDP = "application/sdp"
SDPFRAG = "application/trickle-ice-sdpfrag"


def _ice_credentials(sdp: str) -> tuple[str | None, str | None]:
    ufrag = re.search(r"^a=ice-ufrag:(\S+)", sdp, re.MULTILINE)
    pwd = re.search(r"^a=ice-pwd:(\S+)", sdp, re.MULTILINE)
    return (ufrag.group(1) if ufrag else None, pwd.group(1) if pwd else None)


async def whip_options(request: web.Request) -> web.StreamResponse:
    """`OPTIONS /whip`, the same whether calls run here or in media workers (the front answers it itself)."""
    return web.Response(status=204, headers={"Accept-Post": SDP})


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
            sdp = (await request.read()).decode()
        except web.HTTPRequestEntityTooLarge:
            return json_error(413, f"the offer is larger than {MAX_BODY_BYTES} bytes")
        except UnicodeDecodeError:
            return json_error(400, "the offer is not UTF-8 text")
        try:
            check_offer_sdp(sdp)
        except OfferRejected as rejected:
            self.service.metrics.rejected("bad_offer")
            return json_error(rejected.status, rejected.message)
        try:
            session, answer = await self.service.start_session(
                RTCSessionDescription(sdp=sdp, type="offer"), Persona.from_query(dict(request.query))
            )
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
        fragment = (await request.read()).decode(errors="replace")
        ufrag, pwd = _ice_credentials(fragment)
        current = _ice_credentials(session.remote_sdp)
        if (ufrag and ufrag != current[0]) or (pwd and pwd != current[1]):
            return json_error(422, "ICE restarts are not supported: hang up and call again")
        mid = None
        added = 0
        for line in fragment.splitlines():
            line = line.strip()
            if line.startswith("a=mid:"):
                mid = line[len("a=mid:"):]
            elif line.startswith("a=candidate:"):
                try:
                    candidate = candidate_from_sdp(line[len("a=candidate:"):])
                except (ValueError, IndexError) as exc:
                    return json_error(400, f"a candidate does not parse: {line!r} ({exc})")
                candidate.sdpMid = mid
                await session.add_remote_candidate(candidate)
                added += 1
        log.info("whip session %s: %d trickled candidates", session.session_id, added)
        return web.Response(status=204)

    async def delete(self, request: web.Request) -> web.Response:
        session = self.service.sessions.get(request.match_info["session_id"])
        if session is None:
            return json_error(404, "no such WHIP session (it may have ended already)")
        await session.hang_up("hung up (WHIP DELETE)", kind="hung_up")
        return web.Response(status=200)
