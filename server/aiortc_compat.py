"""Every use of aiortc's private parts, in one place, pinned to the aiortc version it was written for.

aiortc has no extension point for a receiver's jitter buffer, the RTT its
sender measures, or the ICE pair it nominated. This module reaches for
them, checks that they are where aiortc 1.16 keeps them, and raises
`AiortcChanged` (naming what moved) rather than silently doing nothing
after an upgrade; `tests/test_audio_receive.py` fails if the tap is bypassed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import aiortc
from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCRtpSender

log = logging.getLogger(__name__)

PINNED_AIORTC = "1.16."

PacketHandler = Callable[[int, int, int, bytes], None]  # ssrc, sequence number, timestamp, payload


class AiortcChanged(RuntimeError):
    """The installed aiortc does not keep something where this module expects it."""


def check_version() -> None:
    if not aiortc.__version__.startswith(PINNED_AIORTC):
        raise AiortcChanged(
            f"moshi-webrtc's receive path is written against aiortc {PINNED_AIORTC}x, found {aiortc.__version__}: "
            "check server/aiortc_compat.py against the new version, then update the pin in pyproject.toml"
        )


class _PacketTap:
    """Stands where aiortc keeps its audio jitter buffer: every packet aiortc accepted (known payload type,
    counted for RTCP receiver reports) goes to our receive path, and aiortc's decoder gets nothing."""

    def __init__(self, on_packet: PacketHandler):
        self.on_packet = on_packet
        self.packets = 0

    def add(self, packet) -> tuple[bool, None]:
        self.packets += 1
        try:
            self.on_packet(packet.ssrc, packet.sequence_number, packet.timestamp, bytes(packet.payload))
        except Exception:  # nothing a caller sends may break aiortc's RTP handling
            log.exception("the receive path failed on a packet")
        return False, None  # no picture loss to report, no frame for aiortc's decoder


_JITTER_BUFFER = "_RTCRtpReceiver__jitter_buffer"


def tap_audio_receiver(receiver: RTCRtpReceiver, on_packet: PacketHandler) -> _PacketTap:
    """Route an audio receiver's RTP packets to `on_packet` instead of aiortc's jitter buffer and decoder.
    Call it before media flows (after setRemoteDescription). Returns the tap (it counts packets)."""
    check_version()
    if getattr(receiver, "_RTCRtpReceiver__kind", None) != "audio":
        raise ValueError("only an audio receiver's packets can be tapped")
    if not hasattr(receiver, _JITTER_BUFFER):
        raise AiortcChanged(f"aiortc {aiortc.__version__}'s RTCRtpReceiver has no {_JITTER_BUFFER}")
    tap = _PacketTap(on_packet)
    setattr(receiver, _JITTER_BUFFER, tap)
    return tap


def sender_rtt_s(sender: RTCRtpSender) -> float | None:
    """The round trip time from the caller's RTCP receiver reports, when there are some."""
    return getattr(sender, "_RTCRtpSender__rtt", None)


def nominated_candidate_types(pc: RTCPeerConnection) -> set[str] | None:
    """The candidate types ("host", "srflx", "prflx", "relay") of the ICE pair carrying RTP, if known."""
    try:
        transport = pc.getTransceivers()[0].receiver.transport.transport
        pair = transport._connection._nominated.get(1)  # aioice's nominated pair for component 1 (RTP)
        return {pair.local_candidate.type, pair.remote_candidate.type}
    except (AttributeError, IndexError):
        return None
