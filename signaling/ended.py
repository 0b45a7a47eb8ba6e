"""Calls that ended, kept a short while so that a client can still read why (GET /sessions/{id}).

A caller whose call failed (ICE, DTLS, no media, no relay) often has no data channel to hear it on;
the summary of its call, with `end_reason` and `end_kind`, stays readable for `keep_s` seconds, and at
most `max_kept` of them are kept (the oldest go first), so memory stays bounded whatever the call rate.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class EndedSessions:
    """Summaries of ended calls by session id: bounded in number and in age."""

    def __init__(self, max_kept: int = 256, keep_s: float = 300.0, clock: Callable[[], float] = time.monotonic):
        if max_kept < 0 or keep_s < 0:
            raise ValueError("max_kept and keep_s must not be negative")
        self.max_kept, self.keep_s, self._clock = max_kept, keep_s, clock
        self._kept: OrderedDict[str, tuple[float, dict]] = OrderedDict()  # oldest first

    def add(self, session_id: str, summary: dict) -> None:
        self._expire()
        self._kept.pop(session_id, None)
        self._kept[session_id] = (self._clock() + self.keep_s, summary)
        while len(self._kept) > self.max_kept:
            self._kept.popitem(last=False)

    def get(self, session_id: str) -> dict | None:
        self._expire()
        kept = self._kept.get(session_id)
        return kept[1] if kept is not None else None

    def __len__(self) -> int:
        self._expire()
        return len(self._kept)

    def _expire(self) -> None:
        now = self._clock()
        while self._kept:
            expires, _ = next(iter(self._kept.values()))
            if expires > now:
                break
            self._kept.popitem(last=False)
