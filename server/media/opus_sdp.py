"""What our answers say about Opus: in-band FEC wanted.

aiortc writes no `a=fmtp` for Opus, so a browser never learns that we decode
in-band FEC and never sends it. The answer's text is amended before it goes
out: `useinbandfec=1` on every Opus payload type (RFC 7587), other
parameters kept. aiortc's own state is not touched; our receive path decodes
FEC whatever aiortc believes.
"""

from __future__ import annotations

import re

_RTPMAP = re.compile(r"^a=rtpmap:(\d+) opus/48000(?:/\d+)?\s*$", re.IGNORECASE)


def with_opus_fec(sdp: str) -> str:
    lines = sdp.splitlines()
    ending = "\r\n" if "\r\n" in sdp else "\n"
    out: list[str] = []
    opus = {m.group(1) for line in lines if (m := _RTPMAP.match(line))}
    for line in lines:
        fmtp = re.match(r"^a=fmtp:(\d+) (.*)$", line)
        if fmtp and fmtp.group(1) in opus:
            params = [p for p in fmtp.group(2).split(";") if p.strip() and not p.strip().startswith("useinbandfec=")]
            line = f"a=fmtp:{fmtp.group(1)} {';'.join([*params, 'useinbandfec=1'])}"
            opus.discard(fmtp.group(1))  # this payload type has its fmtp now
        out.append(line)
        rtpmap = _RTPMAP.match(line)
        if rtpmap and not any(re.match(rf"^a=fmtp:{rtpmap.group(1)} ", other) for other in lines):
            out.append(f"a=fmtp:{rtpmap.group(1)} minptime=10;useinbandfec=1")
    return ending.join(out) + ending
