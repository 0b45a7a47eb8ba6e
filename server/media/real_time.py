"""No more than real time: a caller's frames reach the engine at most as fast as its audio plays.

A caller that sends RTP faster than its timestamps say (a 10x stream, a
replayed capture) moves our receive clock ahead: the jitter buffer follows
the fastest packet's transit, and every slot it holds is due at once. Left
alone, that steps its engine slot many times per frame of real time, takes
the batch's time from everyone else and fills the slot's backlog with frames
the engine then drops. The gate is a token bucket: one frame's token per
frame of time, at most `slack` frames ahead (the largest shrink of the receive
delay, while the buffer plays faster as its target falls, and a few frames of a
caller's burst after a stall); a quiet spell saves up no more than that. The excess is
dropped here, before any work is done for it, and counted.
"""

from __future__ import annotations

FRAME_SLACK = 8  # frames (640 ms at 80 ms): the receive target's whole range (0.4 s) and three frames more


class RealTimeGate:
    """Admit frames of `frame_s` each at most at real time, with at most `slack` frames of burst."""

    def __init__(self, frame_s: float, slack: int = FRAME_SLACK):
        self.frame_s = frame_s
        self.capacity = 1.0 + slack
        self.admitted = 0
        self.refused = 0
        self._tokens = self.capacity
        self._at: float | None = None

    def admit(self, now: float) -> bool:
        """Whether the frame completed at `now` (seconds on a monotonic clock) may go to the engine."""
        if self._at is not None:
            self._tokens = min(self.capacity, self._tokens + (now - self._at) / self.frame_s)
        self._at = now
        if self._tokens < 1.0:
            self.refused += 1
            return False
        self._tokens -= 1.0
        self.admitted += 1
        return True
