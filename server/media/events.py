"""The messages a call sends on its `events` data channel, defined once.

Each message is JSON with a `type` and the fields of its class below. The page
(`web/app.js`, `onEvent`) handles every type here and reads only these fields;
tests/test_layout.py checks that it does, so a change here that the page does
not follow fails the suite.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Event:
    type: ClassVar[str]

    def to_json(self) -> str:
        return json.dumps({"type": self.type, **dataclasses.asdict(self)})


@dataclass(frozen=True)
class Ready(Event):
    """The data channel opened: which model answers, and whether it is still reading a persona prompt."""

    type: ClassVar[str] = "ready"
    model: str
    test_model: bool
    notice: str | None
    session_id: str
    prompting: bool
    persona: str | None


@dataclass(frozen=True)
class PromptDone(Event):
    """The model has heard its persona prompt (after `seconds`) and listens to the caller now."""

    type: ClassVar[str] = "prompt"
    seconds: float
    state: str = "done"


@dataclass(frozen=True)
class Text(Event):
    """A piece of the model's text, as it speaks."""

    type: ClassVar[str] = "text"
    text: str


@dataclass(frozen=True)
class Drops(Event):
    """The model fell behind: audio was dropped to keep the delay bounded (totals so far in the call)."""

    type: ClassVar[str] = "drops"
    input_frames: int
    output_ms: int


@dataclass(frozen=True)
class Error(Event):
    """Something ended or will end the call; `reason` says what, in words for the caller."""

    type: ClassVar[str] = "error"
    reason: str


@dataclass(frozen=True)
class Bye(Event):
    """The server ends the call (the last message on the channel)."""

    type: ClassVar[str] = "bye"
    reason: str


EVENT_TYPES: dict[str, type[Event]] = {cls.type: cls for cls in (Ready, PromptDone, Text, Drops, Error, Bye)}
