"""The caller's media, watched: a call without a live stream ends, or waits for its caller (a mixin of
server.media.peer.CallSession, which owns the state it reads)."""

from __future__ import annotations

import asyncio
import logging

from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .audio_receive import ARRIVALS_KEPT

log = logging.getLogger(__name__)

MIN_PACKETS_PER_S = 1.0  # what keeps a call: speech is 50 packets a second, Opus DTX in silence 2.5


class MediaWatch:
    """Why a call's media no longer keeps it, in the caller's terms."""

    def _never_connected_cause(self, seconds: float | None = None, since: str = "") -> tuple[str, str]:
        """Why the connection never came up in `seconds` (the media timeout unless said), in the caller's
        terms: aioice waits on an offer without candidates for ever, and gives unanswered checks a minute."""
        waited = f"{self.media_timeout if seconds is None else seconds:g} s" + (f" {since}" if since else "")
        candidates = sum(len(t.receiver.transport.transport.getRemoteCandidates()) for t in self.pc.getTransceivers())
        if candidates == 0:
            return (f"the caller sent no ICE candidates in {waited} (none in its offer, none trickled): a "
                    "client must wait for ICE gathering before it offers, or trickle them (WHIP PATCH)"), "ice_failed"
        ice = self.pc.iceConnectionState
        if ice in ("new", "checking"):
            return (f"ICE did not connect in {waited}: no check succeeded between the server and the caller's "
                    f"{candidates} candidates (UDP blocked on the way? a TURN server helps: --turn-url)"), "ice_failed"
        return f"the connection did not come up in {waited} (ICE {ice}, DTLS unfinished)", "connection_failed"


    async def _watch_audio(self, pc: RTCPeerConnection, track: MediaStreamTrack) -> None:
        """End the call when the caller's track ends, or when the media timeout passes without a live stream
        of packets: at least `MIN_PACKETS_PER_S` on average (a packet now and then, sent to hold a line, is
        not a caller; one listening in silence is, its Opus DTX sends 2.5 a second). The track itself carries
        nothing: its packets go to the receive path. A call that was up and whose caller's media stopped
        waits for the caller within the resume window instead (server.media.handover)."""
        reason, kind = "caller's audio ended", "caller_gone"
        loop = asyncio.get_running_loop()
        watching_since = loop.time()
        needed = min(ARRIVALS_KEPT, max(1, round(MIN_PACKETS_PER_S * self.media_timeout)))
        try:
            while not self._ending:  # checked every turn: a cancel racing a result can be lost in wait_for
                now = loop.time()
                deadline = self._deadline(watching_since, needed, now)
                if now >= deadline:
                    cause, cause_kind = self._no_live_stream(now, needed)
                    if cause_kind == "no_media" and self._may_wait_for_caller():
                        self._go_away(cause)
                        continue
                    self.fail(cause, cause_kind)
                    return
                try:
                    await asyncio.wait_for(track.recv(), deadline - now)
                except TimeoutError:
                    continue
                log.error("session %s: aiortc decoded a frame itself: the receive tap is bypassed", self.session_id)
        except MediaStreamError:
            pass
        except asyncio.CancelledError:
            return
        if self._ending or pc is not self.pc:
            return
        failure = self._recorded_failure()  # the track ends when its transport does: say why, or wait
        if failure is not None:
            self._lost(*failure)
        else:
            self._spawn(self.hang_up(reason, kind=kind))

    def _deadline(self, watching_since: float, needed: int, now: float) -> float:
        """When the watch looks again (away: the caller's return is what it waits for) or ends the call. A
        caller back from away is a stream from its return: the packets from before its absence do not make
        its first few look sparse."""
        if self.handovers.away:
            return now + self.media_timeout
        return self._media_deadline(max(watching_since, self.handovers.back_at), needed)

    def _media_deadline(self, watching_since: float, needed: int) -> float:
        """When the call ends unless more packets come. While the latest `needed` packets came at a live rate,
        a stream that stops has the whole media timeout from its last packet (then it is `no_media`); a
        sparse one has it from the first of those `needed` (or from the start while fewer came)."""
        last = self.receiver.last_packet_at
        first = self.receiver.nth_latest_arrival(needed)
        if last is not None and first is not None and last - first <= (needed - 1) / MIN_PACKETS_PER_S:
            return max(watching_since, last) + self.media_timeout
        return max(watching_since, first or watching_since) + self.media_timeout

    def _no_live_stream(self, now: float, needed: int) -> tuple[str, str]:
        """Why the caller's media no longer keeps the call, and the metrics kind."""
        if self.stats.connected_at is None:
            return self._never_connected_cause()
        last = self.receiver.last_packet_at
        if last is None or now - last >= self.media_timeout:
            return f"no audio from the caller for {self.media_timeout:g} s", "no_media"
        sent = self.receiver.packets_since(now - self.media_timeout)
        return (f"the caller sent {sent} packet(s) in the last {self.media_timeout:g} s, fewer than a live audio "
                f"stream ({needed}; Opus DTX in silence sends {round(2.5 * self.media_timeout)})"), "sparse_media"
