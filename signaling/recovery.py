"""A call that outlives a network change: resume on a new peer connection, and ICE restarts.

    POST /offer               {"sdp", "type": "offer", "resume": {"session_id", "token"}}
                              -> 200 {"sdp", "type": "answer", "session_id", "resume_token", "resumed": true}
    POST /sessions/{id}/offer {"sdp", "type": "offer", "token"}: an ICE restart re-offer
                              -> 200 {"sdp", "type": "answer", "session_id"}
    PATCH /whip/{id}          a trickle-ice-sdpfrag with new ice-ufrag/ice-pwd: an ICE restart (signaling.whip)

The token is the call's `resume_token`, given only to its caller in the answer (256 random bits, compared in
constant time); a wrong one is refused with 403 and counted (`bad_resume_token`). A resume is never told the
line is busy: it takes no new slot. A call that ended answers 410 with its end reason.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from server.media.handover import MoveRefused
from server.media.peer import CallSession

from .connections import BodyRefused
from .errors import json_error
from .offer_check import Offer, OfferRejected, offer_json

if TYPE_CHECKING:
    from .app import SignalingService

log = logging.getLogger(__name__)


class CallRecovery:
    def __init__(self, service: SignalingService):
        self.service = service

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/sessions/{session_id}/offer", self.restart_ice)

    def gone(self, session_id: str) -> web.Response:
        """The answer about a call that is not live here: 410 with its end reason while it is remembered."""
        ended = self.service.ended.get(session_id)
        if ended is None:
            return json_error(404, "no such session (it ended long ago, or never was)")
        return json_error(410, f"the call has ended: {ended.get('end_reason')}",
                          extra={"session_id": session_id, "end_reason": ended.get("end_reason"),
                                 "end_kind": ended.get("end_kind")})

    def _refused(self, request: web.Request, session: CallSession, status: int, message: str) -> web.Response:
        if status == 403:
            self.service.metrics.rejected("bad_resume_token", self.service.client(request),
                                          f"session {session.session_id}: {message}")
        return json_error(status, message)

    async def resume(self, request: web.Request, offer: Offer) -> web.Response:
        """`POST /offer` with "resume": the call's caller back on a new peer connection."""
        assert offer.resume is not None
        session_id = offer.resume.session_id
        session = self.service.sessions.get(session_id)
        if session is None:
            return self.gone(session_id)
        try:
            answer = await asyncio.wait_for(session.resume(offer.description, offer.resume.token),
                                            self.service.config.answer_timeout_s)
        except MoveRefused as refused:
            return self._refused(request, session, refused.status, refused.message)
        except Exception as exc:  # noqa: BLE001 - the call stays away; its caller may try again in the window
            log.warning("session %s: a resume offer could not be applied: %s: %s", session_id, type(exc).__name__, exc)
            return json_error(400, f"the offer could not be applied: {type(exc).__name__}: {exc}")
        return web.json_response({"sdp": answer.sdp, "type": answer.type, "session_id": session_id,
                                  "session_url": self.service.session_url("sessions", session_id),
                                  "resume_token": session.handovers.token,
                                  "resume_window_s": session.handovers.window_s, "resumed": True})

    async def restart_ice(self, request: web.Request) -> web.Response:
        """`POST /sessions/{id}/offer`: an ICE restart re-offer (new ufrag/pwd), answered within the call."""
        session_id = request.match_info["session_id"]
        session = self.service.sessions.get(session_id)
        if session is None:
            return self.gone(session_id)
        try:
            body = await self.service.read_body(request)
        except BodyRefused as exc:
            return exc.response()
        try:
            sdp, token = _parse_reoffer(body, request.content_type)
        except OfferRejected as rejected:
            self.service.metrics.rejected("bad_offer", self.service.client(request), rejected.message)
            return json_error(rejected.status, rejected.message)
        try:
            answer = await session.restart_ice(sdp, token)
        except MoveRefused as refused:
            return self._refused(request, session, refused.status, refused.message)
        return web.json_response({"sdp": answer, "type": "answer", "session_id": session_id})


def _parse_reoffer(body: bytes, content_type: str) -> tuple[str, str]:
    """`{"sdp": ..., "type": "offer", "token": ...}`, its SDP checked as an offer's is."""
    payload, sdp = offer_json(body, content_type, '{"sdp": ..., "type": "offer", "token": ...}')
    token = payload.get("token")
    if not isinstance(token, str) or not token:
        raise OfferRejected(400, '"token" must be the call\'s resume_token (from the answer to its offer)')
    return sdp, token
