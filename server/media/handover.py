"""A call that outlives its network path: the caller's proof of ownership, its time away, its moves.

A phone moving from Wi-Fi to cellular, a NAT that rebinds, a tunnel that drops out: the caller's packets
stop or come from elsewhere, while the conversation (the engine slot and the model's context) should go on.
The call is *away* when its caller's media stopped past the media timeout, or its connection failed; while
away its slot is kept (and counted busy) but not fed: the receive path conceals a little, then pauses. The
caller comes back when its packets flow again: on the same path, a new one the server followed, after an
ICE restart, or on a new peer connection (a resume, which needs the call's resume token). A call away longer
than the resume window ends as `resume_expired`.

Each move is recorded with its gap: how long the audio stopped, as the server saw it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

MOVES = ("followed", "renominated", "restart", "resume", "returned")
MOVES_KEPT = 32  # per call, for /sessions/{id}; the metrics count every one


class MoveRefused(Exception):
    """A resume or an ICE restart the call does not take: `status` for the HTTP answer, `message` says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Move:
    kind: str  # one of MOVES; "returned": the same path came back after an outage
    gap_s: float


class Handovers:
    """One call's away state and moves (see the module's notes)."""

    def __init__(self, window_s: float, on_expired: Callable[[str], None],
                 on_move: Callable[[Move], None] | None = None):
        """`window_s`: how long an away caller may take to come back (0: a call ends when its caller goes
        away). `on_expired(why)`: the window passed. `on_move`: each move, for the metrics."""
        self.window_s = window_s
        self.token = secrets.token_urlsafe(32)  # 256 bits: given only to the caller, in the answer
        self.on_expired = on_expired
        self.on_move = on_move
        self.away_since: float | None = None  # loop time of the caller's last packet before it went away
        self.away_why: str | None = None
        self.back_at = float("-inf")  # loop time at which the caller last came back
        self.moves: list[Move] = []
        self.counts = dict.fromkeys(MOVES, 0)
        self.refused = 0  # resume or restart requests with a wrong token
        self._timer: asyncio.TimerHandle | None = None

    @property
    def resumable(self) -> bool:
        return self.window_s > 0

    @property
    def away(self) -> bool:
        return self.away_since is not None

    def owns(self, token: object) -> bool:
        """Whether `token` is this call's (compared in constant time); a wrong one is counted."""
        if isinstance(token, str) and hmac.compare_digest(token.encode(), self.token.encode()):
            return True
        self.refused += 1
        return False

    def go_away(self, why: str, last_packet_at: float | None) -> None:
        """The caller's media stopped (`why`): keep the call for the window, from its last packet."""
        if self.away_since is not None or not self.resumable:
            return
        loop = asyncio.get_running_loop()
        self.away_since = last_packet_at if last_packet_at is not None else loop.time()
        self.away_why = why
        self._timer = loop.call_at(self.away_since + self.window_s, self._expired)

    def came_back(self, now: float, kind: str) -> Move | None:
        """The caller's packets flow again (`kind`: how it came back): the move, if it was away."""
        if self.away_since is None:
            return None
        move = Move(kind, max(0.0, now - self.away_since))
        self.away_since = self.away_why = None
        self.back_at = now
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.note(move)
        return move

    def note(self, move: Move) -> None:
        self.counts[move.kind] += 1
        self.moves = [*self.moves, move][-MOVES_KEPT:]
        if self.on_move is not None:
            self.on_move(move)

    def _expired(self) -> None:
        self._timer = None
        why = self.away_why or "its media stopped"
        self.on_expired(f"the caller went away ({why}) and did not come back within the {self.window_s:g} s "
                        "resume window")

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def summary(self) -> dict:
        return {
            "away": self.away,
            "resume_window_s": self.window_s,
            "path_switches": self.counts["followed"] + self.counts["renominated"],
            "ice_restarts": self.counts["restart"],
            "resumes": self.counts["resume"],
            "returns": self.counts["returned"],
            "resume_refused": self.refused,
            "moves": [{"kind": m.kind, "gap_s": round(m.gap_s, 3)} for m in self.moves],
        }
