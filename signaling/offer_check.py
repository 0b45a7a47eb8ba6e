"""Checking an offer at the HTTP boundary, before any peer connection exists.

Every rejection is an `OfferRejected` with the HTTP status and a sentence
saying what is wrong, so a client developer can fix their request, and no
half-made peer is left behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from aiortc import RTCSessionDescription
from aiortc.sdp import SessionDescription

from server.model.persona import Persona, PersonaError

MAX_BODY_BYTES = 64 * 1024  # a browser's offer is a few kB; anything this large is not an offer
# What an offer may hold. aiortc's work grows with the square of the media sections (400 audio sections
# cost a worker 3 s of CPU), and it sends ICE checks to every candidate it is given (800 candidates: 1761
# STUN packets to 476 ports, a reflection amplifier at a stranger's bidding).
MAX_SECTIONS = {"audio": 1, "application": 1, "video": 1}  # video is answered as declined: the model hears only
MAX_OFFER_CANDIDATES = 32  # a browser with several interfaces, IPv4 and IPv6, UDP and TCP offers about 10-20


class OfferRejected(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Resume:
    """`"resume": {"session_id": ..., "token": ...}`: the offer is for a call in progress, on a new connection."""

    session_id: str
    token: str

    @classmethod
    def from_json(cls, value: object) -> Resume | None:
        if value is None:
            return None
        if not isinstance(value, dict) or not all(isinstance(value.get(k), str) and 0 < len(value[k]) <= 256
                                                  for k in ("session_id", "token")):
            raise OfferRejected(400, '"resume" must be {"session_id": str, "token": str}, as the call\'s answer '
                                     'gave them (session_id, resume_token)')
        return cls(value["session_id"], value["token"])


@dataclass(frozen=True)
class Offer:
    description: RTCSessionDescription
    persona: Persona | None = None
    resume: Resume | None = None


def parse_offer_json(body: bytes, content_type: str) -> Offer:
    """The `POST /offer` body: JSON `{"sdp": ..., "type": "offer", "persona": {...}, "resume": {...}}` with a
    usable SDP. `persona` is optional: {"prompt": str, "voice": str} for a model that takes one; `resume`
    too: {"session_id": str, "token": str} for a call in progress (signaling.recovery)."""
    payload, sdp = offer_json(body, content_type, '{"sdp": ..., "type": "offer"}')
    try:
        persona = Persona.from_json(payload.get("persona"))
    except PersonaError as exc:
        raise OfferRejected(400, str(exc)) from None
    return Offer(RTCSessionDescription(sdp=sdp, type="offer"), persona, Resume.from_json(payload.get("resume")))


def offer_json(body: bytes, content_type: str, shape: str) -> tuple[dict, str]:
    """A JSON object with `"type": "offer"` and a usable offer SDP in `"sdp"`: (the object, the SDP).
    `shape`: what the body should look like, for the errors."""
    if content_type != "application/json":
        raise OfferRejected(415, f"the body must be application/json, got {content_type or 'no content type'}")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OfferRejected(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # deeply nested arrays or objects: no offer looks like that
        raise OfferRejected(400, "the body is not an offer: its JSON is nested too deeply") from None
    if not isinstance(payload, dict):
        raise OfferRejected(400, f"the body must be a JSON object {shape}")
    if payload.get("type") != "offer":
        raise OfferRejected(400, f'"type" must be "offer", got {payload.get("type")!r}')
    sdp = payload.get("sdp")
    if not isinstance(sdp, str) or not sdp.strip():
        raise OfferRejected(400, '"sdp" must be a non-empty string')
    check_offer_sdp(sdp)
    return payload, sdp


def resume_target(body: bytes) -> str | None:
    """The session a `POST /offer` body resumes, if it is one (the front routes it to that call's worker);
    whatever else is wrong with the body, the worker says."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    resume = payload.get("resume") if isinstance(payload, dict) else None
    session_id = resume.get("session_id") if isinstance(resume, dict) else None
    return session_id if isinstance(session_id, str) else None


def check_offer_sdp(sdp: str) -> None:
    """The SDP parses, stays within the limits above, has a DTLS fingerprint, and offers audio with Opus."""
    if not sdp.lstrip().startswith("v=0"):
        raise OfferRejected(400, "the SDP does not parse: it must start with the line v=0")
    try:
        description = SessionDescription.parse(sdp)
    except Exception as exc:
        raise OfferRejected(400, f"the SDP does not parse: {type(exc).__name__}: {exc}") from None
    kinds = [media.kind for media in description.media]
    for kind in sorted(set(kinds)):
        if kind not in MAX_SECTIONS:
            raise OfferRejected(400, f"the offer has a {kind} section: only audio, video (declined) and a data "
                                     "channel are taken")
        if kinds.count(kind) > MAX_SECTIONS[kind]:
            raise OfferRejected(400, f"the offer has {kinds.count(kind)} {kind} sections: at most "
                                     f"{MAX_SECTIONS[kind]} is taken (one call is one voice)")
    candidates = sum(len(media.ice_candidates) for media in description.media)
    if candidates > MAX_OFFER_CANDIDATES:
        raise OfferRejected(400, f"the offer lists {candidates} ICE candidates: at most {MAX_OFFER_CANDIDATES} "
                                 "are taken")
    unfingerprinted = [media.kind for media in description.media if media.dtls is None or not media.dtls.fingerprints]
    if unfingerprinted:
        raise OfferRejected(400, f"the offer's {unfingerprinted[0]} section has no DTLS fingerprint "
                                 "(a=fingerprint): media is only taken over DTLS-SRTP")
    unnamed = [media.kind for media in description.media if not media.rtp.muxId]
    if unnamed:
        raise OfferRejected(400, f"every media section needs an a=mid line; the {unnamed[0]} section has none")
    audio = [media for media in description.media if media.kind == "audio"]
    if not audio:
        kinds = ", ".join(media.kind for media in description.media) or "nothing"
        raise OfferRejected(422, f"the offer has no audio (it offers {kinds}); the model needs the caller's voice")
    if not any(media.direction in ("sendrecv", "sendonly", None) for media in audio):
        directions = ", ".join(sorted({str(media.direction) for media in audio}))
        raise OfferRejected(422, f"the offer's audio does not send ({directions}): the model needs the caller's voice")
    codecs = {codec.mimeType.lower() for media in audio for codec in media.rtp.codecs}
    if "audio/opus" not in codecs:
        offered = ", ".join(sorted(c.split("/", 1)[-1] for c in codecs)) or "no codecs"
        raise OfferRejected(422, f"the offer's audio has no Opus codec (it offers {offered})")
