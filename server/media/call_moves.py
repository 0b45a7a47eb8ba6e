"""A call that moves: its caller goes away and comes back, on a new path, after an ICE restart or on a new
peer connection (a mixin of server.media.peer.CallSession, which owns the state; the bookkeeping is
server.media.handover's, the ICE agent's part server.media.ice_compat's)."""

from __future__ import annotations

import logging

from aiortc import RTCSessionDescription

from . import ice_compat, sctp_compat
from .handover import Move, MoveRefused
from .ice_restart import ReOffer, answer_for_restart, sdp_ice_credentials
from .opus_sdp import with_opus_fec
from .peer_close import close_peer

log = logging.getLogger(__name__)


class CallMoves:
    """Resume, ICE restart, away and back."""

    def _lost(self, reason: str, kind: str) -> None:
        """The caller's connection failed (`reason`): a call that was up waits for its caller to come back
        (a resume) within the resume window; any other ends."""
        if self._may_wait_for_caller():
            self._go_away(reason)
        else:
            self.fail(reason, kind)

    def _may_wait_for_caller(self) -> bool:
        """Only a caller who was there goes away: connected, and its audio came (a stranger holding a slot
        with a connection that never carried a packet gets no window)."""
        return (self.handovers.resumable and self.stats.connected_at is not None
                and self.receiver.last_packet_at is not None and not self._ending)

    def _on_packet(self, ssrc: int, sequence_number: int, timestamp: int, payload: bytes) -> None:
        """Every RTP packet of the caller's, from whichever connection is the call's now."""
        if self.handovers.away:
            move = self.handovers.came_back(self.receiver.loop.time(), self._return_kind)
            if move is not None:
                log.info("session %s: the caller is back (%s) after %.2f s", self.session_id, move.kind, move.gap_s)
        self.receiver.on_packet(ssrc, sequence_number, timestamp, payload)

    def _go_away(self, why: str) -> None:
        if self.handovers.away:
            return
        self._return_kind = "returned"
        self.handovers.go_away(why, self.receiver.last_packet_at)
        log.warning("session %s (client %s): the caller is away (%s); its slot is kept for %g s for it to come "
                    "back", self.session_id, self.client or "unknown", why, self.handovers.window_s)

    def _resume_expired(self, reason: str) -> None:
        self.fail(reason, kind="resume_expired")

    def _on_move(self, move: Move) -> None:
        if self.observer is not None:
            self.observer.call_moved(move.kind, move.gap_s)

    def _on_path_switch(self, switch: ice_compat.PathSwitch) -> None:
        """The ICE agent sends on a new path: recorded now, or when the away caller's packets flow again. A
        renomination while the old path still carried packets is the caller choosing a better pair (Chromium
        does, just after connecting), not a move; a restart is recorded once, by whichever comes first."""
        if switch.how != "restart":
            self.path = self._media_path()
        if switch.how == "renominated" and switch.quiet_s < ice_compat.QUIET_BEFORE_PROBE_S:
            return
        if switch.how == "restart" and self.handovers.counts["restart"] >= self.ice_restart_requests:
            return  # this restart was recorded already, when the away caller's packets came back
        if self.handovers.away:
            self._return_kind = switch.how
        else:  # the gap: what the server did not hear, or did not send to, whichever was longer
            self.handovers.note(Move(switch.how, max(switch.quiet_s, self.receiver.longest_recent_gap())))

    async def resume(self, offer: RTCSessionDescription, token: object) -> RTCSessionDescription:
        """The caller comes back on a new peer connection, proving with `token` that the call is its own:
        the same slot and model context, the old connection closed. Raises MoveRefused."""
        if self._ending:
            raise MoveRefused(410, f"the call has ended: {self.end_reason}")
        if not self.handovers.resumable:
            raise MoveRefused(409, "this server does not resume calls (--resume-window 0)")
        if not self.handovers.owns(token):
            log.warning("session %s: a resume with a wrong token (client %s)", self.session_id, self.client)
            raise MoveRefused(403, "the resume token does not match this call's")
        old = self.pc
        self._go_away("the caller resumed on a new connection")
        self._return_kind = "resume"
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self.events = None
        self._restart = self._local_ice = None
        self.pc = self._new_peer()
        self._spawn(close_peer(old))
        self.outbound.restart_clock()  # a new sender reads from now on
        answer = await self._apply_offer(offer)
        log.info("session %s: resumed on a new connection", self.session_id)
        return answer

    async def restart_ice(self, offer_sdp: str, token: object | None = None,
                          fragment: bool = False) -> str:
        """An ICE restart (RFC 8445 section 9) within this connection: returns the answer to `offer_sdp`, a
        re-offer with new ICE credentials and the same DTLS fingerprint (or, `fragment`, WHIP's
        trickle-ice-sdpfrag with new credentials). `token`: the call's resume token (the JSON API asks for
        it; WHIP's session URL is its own secret). Raises MoveRefused."""
        if self._ending:
            raise MoveRefused(410, f"the call has ended: {self.end_reason}")
        if token is not None and not self.handovers.owns(token):
            raise MoveRefused(403, "the resume token does not match this call's")
        if self.follower is None or self.pc.localDescription is None:
            raise MoveRefused(409, "the call has no ICE agent to restart yet")
        reoffer = ReOffer.parse(offer_sdp, self.remote_sdp, self._restart, fragment=fragment)
        local = ice_compat.restart_ice(self.follower, reoffer.credentials, reoffer.candidates)
        self._restart = reoffer
        self._local_ice = local
        self.ice_restart_requests += 1
        last = self.receiver.last_packet_at
        if last is not None and self.receiver.loop.time() - last > ice_compat.QUIET_BEFORE_PROBE_S:
            self._go_away("its connection restarts ICE")  # its audio stopped: the restart brings it back
        if self.handovers.away:
            self._return_kind = "restart"
        log.info("session %s: ICE restart (caller ufrag %s)", self.session_id, reoffer.credentials.ufrag)
        return self.local_sdp

    @property
    def local_sdp(self) -> str:
        """The server's answer as it stands (with its ICE credentials of the latest restart, if any)."""
        description = self.pc.localDescription
        if description is None:
            return ""
        sdp = sctp_compat.with_max_message_size(with_opus_fec(description.sdp))
        return answer_for_restart(sdp, self._local_ice) if self._local_ice is not None else sdp

    @property
    def remote_ice_credentials(self) -> tuple[str | None, str | None]:
        """The caller's ICE ufrag and pwd now (an ICE restart changes them)."""
        if self._restart is not None:
            return self._restart.credentials.ufrag, self._restart.credentials.pwd
        return sdp_ice_credentials(self.remote_sdp)
