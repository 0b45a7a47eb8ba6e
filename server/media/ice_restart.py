"""An ICE restart's SDP: the caller's re-offer checked, and the server's answer to it (RFC 8445 section 9, JSEP).

A re-offer restarts ICE when it carries new ice-ufrag/ice-pwd. This server takes a re-offer only for that:
the same media sections (by mid, in order) and the same DTLS fingerprint, so that the DTLS/SRTP session, the
engine slot and the model's context all carry on; anything else is a new call (or a resume, with a new
peer connection). The answer is the call's answer as it stands with the server's new credentials: the same
sockets, candidates, fingerprint and DTLS role.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aioice import Candidate

from .handover import MoveRefused
from .ice_compat import IceCredentials

MAX_RESTART_CANDIDATES = 32  # as an offer's (signaling.offer_check.MAX_OFFER_CANDIDATES)


def sdp_ice_credentials(sdp: str) -> tuple[str | None, str | None]:
    """The first ice-ufrag and ice-pwd of an SDP (or fragment): with BUNDLE, one transport has one pair."""
    ufrag = re.search(r"^a=ice-ufrag:(\S+)", sdp, re.MULTILINE)
    pwd = re.search(r"^a=ice-pwd:(\S+)", sdp, re.MULTILINE)
    return (ufrag.group(1) if ufrag else None, pwd.group(1) if pwd else None)


def _fingerprints(sdp: str) -> set[str]:
    return {line.split(None, 1)[-1].strip().lower() for line in re.findall(r"^a=fingerprint:(.+)$", sdp, re.M)}


def _mids(sdp: str) -> list[str]:
    return re.findall(r"^a=mid:(\S+)", sdp, re.MULTILINE)


@dataclass(frozen=True)
class ReOffer:
    credentials: IceCredentials
    candidates: list[Candidate]

    @classmethod
    def parse(cls, sdp: str, original: str, previous: ReOffer | None = None, fragment: bool = False) -> ReOffer:
        """Check a re-offer against the call's `original` offer (and the `previous` restart's credentials).
        `fragment`: a WHIP trickle-ice-sdpfrag (RFC 9725 section 4.3.2), which names some of the sections and
        carries no fingerprint."""
        ufrag, pwd = sdp_ice_credentials(sdp)
        if not ufrag or not pwd:
            raise MoveRefused(400, "the re-offer has no a=ice-ufrag and a=ice-pwd")
        if not (4 <= len(ufrag) <= 256 and 22 <= len(pwd) <= 256):
            raise MoveRefused(400, "ICE credentials must be a ufrag of 4-256 and a pwd of 22-256 characters")
        current = (previous.credentials.ufrag, previous.credentials.pwd) if previous else sdp_ice_credentials(original)
        if ufrag == current[0] or pwd == current[1]:
            raise MoveRefused(422, "the re-offer keeps the ICE credentials: only an ICE restart (a new "
                                         "ice-ufrag and ice-pwd) is taken on a call; trickle candidates instead")
        if not fragment and _fingerprints(sdp) != _fingerprints(original):
            raise MoveRefused(422, "the re-offer has another DTLS fingerprint: that is a new connection, "
                                         "not an ICE restart; resume the call with POST /offer and \"resume\"")
        if (not set(_mids(sdp)) <= set(_mids(original))) if fragment else _mids(sdp) != _mids(original):
            raise MoveRefused(422, f"the re-offer's media sections ({', '.join(_mids(sdp)) or 'none'}) are "
                                         f"not the call's ({', '.join(_mids(original))}): only ICE may change")
        candidates = []
        for line in re.findall(r"^a=candidate:(.+)$", sdp, re.MULTILINE):
            if len(candidates) == MAX_RESTART_CANDIDATES:
                raise MoveRefused(400, f"the re-offer lists more than {MAX_RESTART_CANDIDATES} candidates")
            try:
                candidate = Candidate.from_sdp(line.strip())
            except (ValueError, IndexError) as exc:
                raise MoveRefused(400, f"a candidate does not parse: {line[:200]!r} ({exc})") from None
            if candidate.transport.lower() == "udp" and candidate.component == 1:
                candidates.append(candidate)
        return cls(IceCredentials(ufrag, pwd), candidates)


def answer_for_restart(answer_sdp: str, local: IceCredentials) -> str:
    """The call's answer with the server's credentials after a restart."""
    sdp = re.sub(r"^a=ice-ufrag:\S+", f"a=ice-ufrag:{local.ufrag}", answer_sdp, flags=re.MULTILINE)
    return re.sub(r"^a=ice-pwd:\S+", f"a=ice-pwd:{local.pwd}", sdp, flags=re.MULTILINE)


def restart_fragment(answer_sdp: str) -> str:
    """RFC 9725 section 4.3.2: the answer to a WHIP ICE restart, a trickle-ice-sdpfrag with the server's new
    credentials and its candidates, per media section."""
    ufrag, pwd = sdp_ice_credentials(answer_sdp)
    lines = [f"a=ice-ufrag:{ufrag}", f"a=ice-pwd:{pwd}"]
    for section in re.split(r"^(?=m=)", answer_sdp, flags=re.MULTILINE)[1:]:
        mid = re.search(r"^a=mid:(\S+)", section, re.MULTILINE)
        kind = section.split(None, 1)[0][2:]
        lines += [f"m={kind} 9 UDP/TLS/RTP/SAVPF 0" if kind != "application" else "m=application 9 UDP/DTLS/SCTP "
                  "webrtc-datachannel", f"a=mid:{mid.group(1) if mid else '0'}"]
        lines += [f"a=candidate:{c}" for c in re.findall(r"^a=candidate:(\S.*?)\s*$", section, re.MULTILINE)]
        lines.append("a=end-of-candidates")
    return "\r\n".join(lines) + "\r\n"
