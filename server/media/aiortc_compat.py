"""Every use of aiortc's private parts, in one place, pinned to the aiortc version it was written for.

aiortc has no extension point for a receiver's jitter buffer, a sender's
encoder (and the executor it runs it on, and the audio level it computes per
frame), the RTT its sender measures, the ICE pair it nominated, the DTLS role
it takes or the cipher suites its DTLS offers. This module reaches for
them, checks that they are where aiortc 1.16 keeps them, and raises
`AiortcChanged` (naming what moved) rather than silently doing nothing
after an upgrade; `tests/test_audio_receive.py` fails if the tap is bypassed,
`tests/test_dtls_certificates.py` if the DTLS role or the cipher suites are.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import sys
from collections.abc import Callable
from typing import Any

import aiortc
import aiortc.rtcdtlstransport
import aiortc.rtp
import av
import numpy as np
from aiortc import RTCCertificate, RTCPeerConnection, RTCRtpReceiver, RTCRtpSender, RTCSessionDescription
from aiortc.codecs.base import Encoder
from OpenSSL import SSL

from .opus_codec import OpusEncoder

log = logging.getLogger(__name__)

PINNED_AIORTC = "1.16."

PacketHandler = Callable[[int, int, int, bytes], None]  # ssrc, sequence number, timestamp, payload


class AiortcChanged(RuntimeError):
    """The installed aiortc does not keep something where this module expects it."""


def check_version() -> None:
    if not aiortc.__version__.startswith(PINNED_AIORTC):
        raise AiortcChanged(
            f"moshi-webrtc's receive path is written against aiortc {PINNED_AIORTC}x, found {aiortc.__version__}: "
            "check server/media/aiortc_compat.py against the new version, then update the pin in pyproject.toml"
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


def count_unroutable_rtp(receiver: RTCRtpReceiver, on_unroutable: Callable[[int], None]) -> None:
    """Tell `on_unroutable(payload_type)` about each RTP packet on the receiver's transport that aiortc's
    router drops unseen (a payload type nobody negotiated): otherwise they vanish without a count.
    Call it after setRemoteDescription, when the transport exists."""
    check_version()
    router = getattr(receiver.transport, "_rtp_router", None)
    route_rtp = getattr(router, "route_rtp", None)
    if route_rtp is None:
        raise AiortcChanged(f"aiortc {aiortc.__version__}'s RTCDtlsTransport has no _rtp_router.route_rtp")

    def route_and_count(packet):
        routed = route_rtp(packet)
        if routed is None:
            on_unroutable(packet.payload_type)
        return routed

    router.route_rtp = route_and_count


def sender_rtt_s(sender: RTCRtpSender) -> float | None:
    """The round trip time from the caller's RTCP receiver reports, when there are some."""
    return getattr(sender, "_RTCRtpSender__rtt", None)


class OpusSenderEncoder(Encoder):
    """aiortc's encoder interface around our libopus encoder (server.media.opus_codec.OpusEncoder): mono, FEC
    with an expected loss that the owner updates (`set_expected_loss`), one packet per 20 ms frame.
    `use_opus_encoder` has aiortc call `encode` on the event loop (aiortc alone would use an executor
    thread; the loss is a plain int either way)."""

    def __init__(self, expected_loss_percent: int = 0):
        self.expected_loss_percent = expected_loss_percent
        self._opus: OpusEncoder | None = None
        self._pending = np.zeros(0, dtype=np.float32)
        self._samples_out = 0  # at the encoder's rate

    def set_expected_loss(self, percent: float) -> None:
        self.expected_loss_percent = int(min(100, max(0, round(percent))))

    def encode(self, frame: av.AudioFrame, force_keyframe: bool = False) -> tuple[list[bytes], int | None]:
        if self._opus is None:
            self._opus = OpusEncoder(frame.sample_rate, expected_loss_percent=self.expected_loss_percent)
        opus = self._opus
        opus.set_expected_loss(self.expected_loss_percent)
        samples = _mono_float(frame)
        if len(self._pending):
            samples = np.concatenate([self._pending, samples])
        if len(samples) < opus.frame_samples:
            self._pending = samples
            return [], None
        packet = opus.encode(samples[: opus.frame_samples])
        self._pending = samples[opus.frame_samples :][: 4 * opus.frame_samples]  # bounded, if frames overrun
        timestamp = self._samples_out * 48000 // opus.sample_rate  # Opus's RTP clock is 48 kHz
        self._samples_out += opus.frame_samples
        return [packet], timestamp

    def pack(self, packet) -> tuple[list[bytes], int]:
        raise NotImplementedError("this encoder takes audio frames, not encoded packets")


def _mono_float(frame: av.AudioFrame) -> np.ndarray:
    """A frame's samples as float32 mono in [-1, 1], channels averaged (no -3 dB downmix)."""
    name = frame.format.name
    channels = frame.layout.nb_channels
    if name == "s16" and frame.samples:  # what our outbound track sends: read the plane, no to_ndarray copy
        pcm = np.frombuffer(frame.planes[0], dtype=np.int16, count=frame.samples * channels)
        if channels == 1:
            return pcm * np.float32(1 / 32768)
        if channels == 2:  # (l + r) / 2 / 32768: exact in float32, as the mean of the scaled channels is
            stereo = pcm.reshape(-1, 2)
            return np.add(stereo[:, 0], stereo[:, 1], dtype=np.float32) * np.float32(1 / 65536)
    planes = frame.to_ndarray().astype(np.float32)
    if name in ("s16", "s16p"):
        planes /= 32768.0
    if not frame.format.is_planar:
        planes = planes.reshape(-1, channels).T
    return planes.mean(axis=0)


_ENCODER = "_RTCRtpSender__encoder"
_SENDER_LOOP = "_RTCRtpSender__loop"


class _InlineEncodeLoop:
    """Stands where an audio sender keeps its event loop, which aiortc 1.16 uses for one thing: to run each
    frame's `encode` on the default executor. For Opus on 20 ms frames (70 to 220 us here) the hand-off to
    a thread and back (a future, a lock, a wake-up and the loop's self-pipe, per frame and call) cost about
    as much CPU as the encoding (profiled, 6 echo calls): here `encode` runs on the loop, and the sender
    awaits a future that is already done."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop

    def run_in_executor(self, executor: Any, func: Callable, *args: Any) -> asyncio.Future:
        future = self._loop.create_future()
        try:
            future.set_result(func(*args))
        except Exception as exc:  # raised where aiortc awaits it, as from the executor
            future.set_exception(exc)
        return future

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


def use_opus_encoder(sender: RTCRtpSender, encoder: OpusSenderEncoder) -> None:
    """Make an audio sender encode with `encoder` (aiortc would make its own, without FEC, at first send),
    on the event loop rather than an executor thread, with aiortc's audio level computed natively."""
    check_version()
    if getattr(sender, "_RTCRtpSender__kind", None) != "audio":
        raise ValueError("only an audio sender can take an Opus encoder")
    for name in (_ENCODER, _SENDER_LOOP):
        if not hasattr(sender, name):
            raise AiortcChanged(f"aiortc {aiortc.__version__}'s RTCRtpSender has no {name}")
    setattr(sender, _ENCODER, encoder)
    loop = getattr(sender, _SENDER_LOOP)
    if not isinstance(loop, _InlineEncodeLoop):
        setattr(sender, _SENDER_LOOP, _InlineEncodeLoop(loop))
    use_fast_audio_level()


_MAX_SAMPLE = 32767
_AIORTC_AUDIO_LEVEL = aiortc.rtp.compute_audio_level_dbov  # aiortc's own, for the tests to compare with


def audio_level_dbov(frame: av.AudioFrame) -> int:
    """aiortc's `compute_audio_level_dbov` (RFC 6465, Appendix A, as aiortc computes it: the sum of squares
    over the first plane's 16-bit samples, over `frame.samples`), in numpy instead of a Python loop over
    each sample (110 us a frame, about what the Opus encoding costs; 4 us here). The integer sum is exact,
    so the level is the same to the bit."""
    pcm = np.frombuffer(frame.planes[0], dtype=np.int16)
    wide = pcm.astype(np.int64)
    energy = float(np.dot(wide, wide))
    rms = math.sqrt(energy / (frame.samples * _MAX_SAMPLE * _MAX_SAMPLE))
    if rms > 0:
        return round(min(max(20 * math.log10(rms), -127), 0))
    return -127


def use_fast_audio_level() -> None:
    """Have every aiortc sender compute its frames' audio level (the ssrc-audio-level RTP header extension,
    which browsers negotiate) with `audio_level_dbov`: the same value, natively."""
    check_version()
    if not callable(getattr(aiortc.rtp, "compute_audio_level_dbov", None)):
        raise AiortcChanged(f"aiortc {aiortc.__version__} has no aiortc.rtp.compute_audio_level_dbov")
    aiortc.rtp.compute_audio_level_dbov = audio_level_dbov


# -- DTLS: callers with any standard certificate --------------------------------------------------
#
# A DTLS cipher suite names the server's certificate type: ECDHE-ECDSA-* needs an ECDSA certificate on
# the server side, ECDHE-RSA-* an RSA one; the client's certificate can be either under any suite.
# aiortc 1.16's certificate is ECDSA P-256, and its DTLS context allows ECDHE-ECDSA suites only. So
# where aiortc is the DTLS client, a peer whose certificate is RSA (GStreamer's webrtcbin: RSA 2048)
# has no suite it may pick ("no shared cipher"). Two mends, each enough for a caller that offers
# `a=setup:actpass` (every browser, webrtcbin, libwebrtc and libdatachannel clients):
#   - `answer_as_dtls_server`: our answer takes the DTLS server role (`a=setup:passive`), as the offer
#     leaves it to us; our ECDSA certificate then fixes the suite, and the caller's certificate type
#     does not matter.
#   - `allow_rsa_dtls_peers`: aiortc's DTLS also offers and accepts the ECDHE-RSA twin of each of its
#     ECDHE-ECDSA suites, for peers that make us the DTLS client (an offer with `a=setup:passive`),
#     and for our own caller (server.caller) when an answer makes it the client of an RSA server.
# The certificate fingerprints in the SDP are checked after the handshake as before (aiortc's
# `_validate_peer_identity`): neither mend touches that.

_CREATE_SSL_CONTEXT = "_create_ssl_context"


def _with_rsa_twins(ciphers: list[str]) -> str:
    """OpenSSL's cipher string: each ECDHE-ECDSA suite followed by its ECDHE-RSA twin, order kept."""
    out: list[str] = []
    for name in ciphers:
        for suite in (name, name.replace("ECDHE-ECDSA-", "ECDHE-RSA-", 1)):
            if suite not in out:
                out.append(suite)
    return ":".join(out)


def allow_rsa_dtls_peers() -> None:
    """Have every aiortc DTLS context (one per transport, made from our certificate) allow the ECDHE-RSA
    twin of each ECDHE-ECDSA suite aiortc allows, so a peer with an RSA certificate can be our DTLS
    server. When we are the server (our certificate is ECDSA), OpenSSL never picks an RSA suite: nothing
    changes there. Idempotent; installed by every peer connection this project makes."""
    check_version()
    create = getattr(RTCCertificate, _CREATE_SSL_CONTEXT, None)
    if not callable(create):
        raise AiortcChanged(f"aiortc {aiortc.__version__}'s RTCCertificate has no {_CREATE_SSL_CONTEXT}")
    if getattr(create, "_allows_rsa_peers", False):
        return

    ciphers: bytes | None = None  # aiortc's list with the twins: read once, from a context of its own

    def create_allowing_rsa_peers(self, *args, **kwargs) -> SSL.Context:
        nonlocal ciphers
        if ciphers is None:  # pyOpenSSL reads a list only through a Connection, after which the context is frozen
            ciphers = _with_rsa_twins(SSL.Connection(create(self, *args, **kwargs)).get_cipher_list()).encode()
        context = create(self, *args, **kwargs)
        context.set_cipher_list(ciphers)
        return context

    create_allowing_rsa_peers._allows_rsa_peers = True  # type: ignore[attr-defined]
    create_allowing_rsa_peers._aiortc_original = create  # type: ignore[attr-defined]
    setattr(RTCCertificate, _CREATE_SSL_CONTEXT, create_allowing_rsa_peers)


_SETUP = re.compile(r"^a=setup:([A-Za-z]+)", re.MULTILINE)


def dtls_roles(pc: RTCPeerConnection) -> set[str]:
    """The DTLS roles ("client", "server", or "auto" until negotiated) of a peer connection's transports."""
    transports = [t.receiver.transport for t in pc.getTransceivers()]
    if pc.sctp is not None:
        transports.append(pc.sctp.transport)
    roles = set()
    for transport in transports:
        role = getattr(transport, "_role", None)
        if role is None:
            raise AiortcChanged(f"aiortc {aiortc.__version__}'s RTCDtlsTransport has no _role")
        roles.add(role)
    return roles


async def answer_as_dtls_server(pc: RTCPeerConnection) -> None:
    """Create and set the local answer to the remote offer (set already), taking the DTLS server role
    (`a=setup:passive`) where the offer leaves the choice to us (`a=setup:actpass`). aiortc 1.16 would
    always answer `active`; it takes the role its local answer says, so the answer is amended before it
    is set. An offer that asks for a role (`active` or `passive`) gets the other one, as before."""
    check_version()
    answer = await pc.createAnswer()
    offered = {setup.lower() for setup in _SETUP.findall(pc.remoteDescription.sdp)}
    if offered != {"actpass"}:
        await pc.setLocalDescription(answer)
        return
    sdp = _SETUP.sub("a=setup:passive", answer.sdp)
    await pc.setLocalDescription(RTCSessionDescription(sdp=sdp, type=answer.type))
    roles = dtls_roles(pc)
    if roles != {"server"}:
        raise AiortcChanged(
            f"aiortc {aiortc.__version__} did not take the DTLS server role from our answer's a=setup:passive "
            f"(its transports are {sorted(roles)}): see answer_as_dtls_server in server/aiortc_compat.py"
        )


_CERTIFICATES = "_RTCPeerConnection__certificates"


def use_certificate(pc: RTCPeerConnection, certificate: RTCCertificate) -> None:
    """Have `pc` present `certificate` in DTLS (and its fingerprints in SDP) instead of the ECDSA one aiortc
    generated for it: a caller with an RSA certificate, as GStreamer's is. aiortc takes no certificate in
    its configuration. Call it right after making `pc`, before any track or channel is added (each
    transport takes the certificate when it is made)."""
    check_version()
    if not isinstance(getattr(pc, _CERTIFICATES, None), list):
        raise AiortcChanged(f"aiortc {aiortc.__version__}'s RTCPeerConnection has no {_CERTIFICATES}")
    if pc.getTransceivers() or pc.sctp is not None:
        raise ValueError("use_certificate must come before the peer connection makes its transports")
    setattr(pc, _CERTIFICATES, [certificate])


# -- why a connection failed ----------------------------------------------------------------------
#
# aiortc 1.16 says only that a transport went to "failed". The cause is known for a moment and then lost:
#   - ICE: RTCIceTransport.start() catches aioice's ConnectionError ("ICE negotiation failed": every
#     candidate pair's checks failed or timed out, or there was no pair at all) and sets "failed"; after
#     a connection, its _monitor sets "failed" when aioice's consent checks (RFC 7675) go unanswered.
#   - DTLS: RTCDtlsTransport._do_handshake catches OpenSSL's SSL.Error or a ConnectionError and sets
#     "failed". The SSL.Error's reason (our own error such as "no shared cipher", or the alert the peer
#     sent: "tls alert handshake failure") is usually gone by then: _recv_next feeds each datagram with
#     SSL.Connection.recv, which runs the handshake and swallows the SSL.Error, so the next do_handshake
#     raises one with no reason. `recv` is wrapped on the transport's SSL connection (made just before it
#     goes to "connecting") to keep the first reason. _validate_peer_identity sets "failed" with no
#     exception when the peer's certificate does not match the offer's a=fingerprint; _setup_srtp when
#     no SRTP profile was negotiated. Each writes only a DEBUG line, without the session's name.
# Each transport emits "statechange" synchronously inside those except blocks, so a listener sees the
# exception being handled (sys.exc_info) and the transport's state as it failed.

_FINGERPRINT = re.compile(r"^a=fingerprint:(\S+) (\S+)", re.MULTILINE)
_STATE_NAMES = {"SUCCEEDED": "succeeded", "FAILED": "failed", "IN_PROGRESS": "unanswered",
                "WAITING": "not checked", "FROZEN": "not checked"}


class TransportFailures:
    """What made a peer connection's ICE or DTLS transport fail, in words for the caller and the log."""

    def __init__(self, pc: RTCPeerConnection):
        self._pc = pc
        self.ice: str | None = None
        self.dtls: str | None = None
        self._ice_completed = False
        self._ssl_error: SSL.Error | None = None

    def on_ice_state(self, ice: aiortc.RTCIceTransport) -> None:
        if ice.state == "completed":
            self._ice_completed = True
        elif ice.state == "failed" and self.ice is None:
            self.ice = self._ice_cause(ice)

    def on_dtls_state(self, dtls: aiortc.RTCDtlsTransport) -> None:
        if dtls.state == "connecting":
            self._keep_ssl_errors(getattr(dtls, "_ssl", None))
        elif dtls.state == "failed" and self.dtls is None:
            self.dtls = self._dtls_cause(dtls, sys.exc_info()[1])

    def _keep_ssl_errors(self, ssl: SSL.Connection | None) -> None:
        """Keep the first SSL.Error that aiortc's _recv_next would swallow (see above)."""
        recv = getattr(ssl, "recv", None)
        if recv is None:
            raise AiortcChanged(f"aiortc {aiortc.__version__}'s RTCDtlsTransport has no _ssl when connecting")

        def recv_keeping_errors(*args: Any, **kwargs: Any) -> Any:
            try:
                return recv(*args, **kwargs)
            except SSL.Error as exc:
                if self._ssl_error is None and _ssl_reasons(exc):
                    self._ssl_error = exc
                raise

        ssl.recv = recv_keeping_errors  # type: ignore[method-assign]

    def _ice_cause(self, ice: aiortc.RTCIceTransport) -> str:
        if self._ice_completed:
            return "ICE failed: the caller stopped answering ICE consent checks (its network went away)"
        remote = ice.getRemoteCandidates()
        if not remote:
            return "ICE failed: the caller gave no ICE candidates (none in the offer, none trickled)"
        pairs = getattr(getattr(ice, "_connection", None), "_check_list", None) or []
        outcome: dict[str, int] = {}
        for pair in pairs:
            state = _STATE_NAMES.get(getattr(pair.state, "name", ""), "unknown")
            outcome[state] = outcome.get(state, 0) + 1
        checks = ", ".join(f"{count} {state}" for state, count in sorted(outcome.items())) or "none formed"
        shown = ", ".join(f"{c.type} {c.ip}:{c.port}/{c.protocol}" for c in remote[:4])
        more = f" and {len(remote) - 4} more" if len(remote) > 4 else ""
        return (f"ICE failed: no candidate pair succeeded ({len(pairs)} pairs: {checks}) with the caller's "
                f"candidates {shown}{more}; the caller is unreachable from the server or never answered")

    def _dtls_cause(self, dtls: aiortc.RTCDtlsTransport, exc: BaseException | None) -> str:
        if isinstance(exc, SSL.Error):
            return f"DTLS handshake failed: {_ssl_error_text(exc if _ssl_reasons(exc) else self._ssl_error or exc)}"
        if isinstance(exc, ConnectionError):
            return "DTLS handshake failed: the ICE connection closed during the handshake"
        ssl = getattr(dtls, "_ssl", None)
        certificate = ssl.get_peer_certificate(as_cryptography=True) if ssl is not None else None
        if certificate is not None:
            mismatch = self._fingerprint_mismatch(certificate)
            if mismatch is not None:
                return mismatch
            if ssl.get_selected_srtp_profile() in (None, b""):
                return "DTLS failed: no SRTP protection profile in common with the caller"
        return "DTLS failed"

    def _fingerprint_mismatch(self, certificate) -> str | None:
        remote = self._pc.remoteDescription
        offered = _FINGERPRINT.findall(remote.sdp) if remote is not None else []
        for algorithm, value in offered:
            try:
                actual = aiortc.rtcdtlstransport.certificate_digest(certificate, algorithm.lower())
            except (KeyError, ValueError):
                continue
            if value.upper() != actual:
                return (f"DTLS failed: the caller's certificate ({algorithm} {actual}) does not match the "
                        f"a=fingerprint in its offer ({algorithm} {value.upper()})")
        if not offered:
            return "DTLS failed: the caller's offer has no a=fingerprint for its certificate"
        return None


def _ssl_reasons(exc: SSL.Error) -> list[str]:
    """The reasons in pyOpenSSL's error: a list of (library, function, reason) from OpenSSL's queue."""
    entries = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    return [entry[2] for entry in entries if isinstance(entry, tuple) and len(entry) == 3 and entry[2]]


def _ssl_error_text(exc: SSL.Error) -> str:
    """OpenSSL's reasons; an alert the peer sent reads "the caller sent the TLS alert ..."."""
    reasons = _ssl_reasons(exc)
    if not reasons:
        return "OpenSSL gave no reason"
    texts = []
    for reason in reasons:
        alert = re.match(r"(?:ssl\w*|tls\w*) alert (.+)", reason)
        texts.append(f"the caller sent the TLS alert '{alert.group(1)}'" if alert else reason)
    return "; ".join(texts)


def watch_transport_failures(pc: RTCPeerConnection) -> TransportFailures:
    """Record why `pc`'s ICE or DTLS transport fails. Call it after setRemoteDescription (the transports
    exist then) and before setLocalDescription (which starts ICE)."""
    check_version()
    failures = TransportFailures(pc)
    transports = [t.receiver.transport for t in pc.getTransceivers()]
    if pc.sctp is not None:
        transports.append(pc.sctp.transport)
    seen: set[int] = set()
    for dtls in transports:
        if id(dtls) in seen:
            continue
        seen.add(id(dtls))
        dtls.on("statechange", lambda dtls=dtls: failures.on_dtls_state(dtls))
        ice = dtls.transport
        ice.on("statechange", lambda ice=ice: failures.on_ice_state(ice))
    return failures
