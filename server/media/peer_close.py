"""Closing a peer connection whatever state it is in."""

from __future__ import annotations

import logging

from aiortc import RTCPeerConnection

log = logging.getLogger(__name__)


async def close_peer(pc: RTCPeerConnection) -> None:
    """Close a peer connection, even one a malformed offer left half made (aiortc's close() can raise
    then): whatever close() did not reach is stopped one transport at a time, so no socket is left open."""
    try:
        await pc.close()
        return
    except Exception as exc:  # noqa: BLE001 - found by fuzzing: an offer missing an a=mid line
        log.warning("peer connection close failed (%s: %s); stopping its transports one by one",
                    type(exc).__name__, exc)
    transports = [t.receiver.transport for t in pc.getTransceivers()]
    if pc.sctp is not None:
        transports.append(pc.sctp.transport)
    for dtls in transports:
        for transport in (dtls, getattr(dtls, "transport", None)):
            if transport is None:
                continue
            try:
                await transport.stop()
            except Exception:  # noqa: BLE001, S112 - best effort on a broken peer
                continue
