"""Callers with either standard DTLS certificate, ECDSA (aiortc, browsers) or RSA (GStreamer, many native
stacks), in either DTLS role: the server's answer role and cipher suites (server.aiortc_compat).

A cipher suite names the DTLS *server's* certificate type. The server answers an `actpass` offer as the
DTLS server (`a=setup:passive`), so its own ECDSA certificate fixes the suite; when an offer makes it the
DTLS client, it must accept an ECDHE-RSA suite from a server with an RSA certificate. GStreamer's own
stack is in tests/test_gstreamer.py; here the caller is aiortc with an RSA certificate.
"""

from __future__ import annotations

import datetime
import re

import aiortc
import numpy as np
import pytest
from aiortc import RTCCertificate, RTCPeerConnection, RTCSessionDescription
from conftest import connect
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from test_call_e2e import dbfs, tone

from server.caller import place_call
from server.media import aiortc_compat

SETUP = re.compile(r"^a=setup:(\w+)", re.MULTILINE)


def rsa_certificate() -> RTCCertificate:
    """A self-signed RSA 2048 certificate, as GStreamer's webrtcbin makes for itself."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa-caller")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    return RTCCertificate(key=key, cert=cert)


class AskForSetup:
    """Rewrites the offer's `a=setup:actpass` to another role, and keeps the answer it saw."""

    def __init__(self, setup: str = "actpass"):
        self.setup, self.answer_sdp = setup, ""

    def offer(self, sdp: str) -> str:
        return SETUP.sub(f"a=setup:{self.setup}", sdp)

    def answer(self, sdp: str) -> str:
        self.answer_sdp = sdp
        return sdp


def assert_echoed_tone(audio: np.ndarray, rate: int = 24000) -> None:
    voiced = np.flatnonzero(np.abs(audio) > 0.02)
    assert voiced.size > rate
    steady = audio[voiced[0] + rate // 5 : voiced[-1] - rate // 5]  # the tone's middle, away from codec edges
    assert dbfs(steady) == pytest.approx(-20.0, abs=2.0)
    spectrum = np.abs(np.fft.rfft(steady * np.hanning(steady.size)))
    assert np.fft.rfftfreq(steady.size, 1 / rate)[np.argmax(spectrum)] == pytest.approx(440.0, abs=5.0)


@pytest.mark.parametrize("setup, answered", [("actpass", "passive"), ("active", "passive"), ("passive", "active")])
async def test_a_caller_with_an_rsa_certificate_connects_in_any_dtls_role(echo_server, setup, answered):
    """actpass: the server takes the DTLS server role, and its ECDSA certificate picks the suite. active: the
    caller asks to be the DTLS client, the same. passive: the caller (RSA) is the DTLS server, and the
    server's DTLS client must accept an ECDHE-RSA suite (allow_rsa_dtls_peers)."""
    sdp = AskForSetup(setup)
    recording = await place_call(echo_server.url, tone(440, 2.5), tail_s=0.5, events=False, sdp=sdp,
                                 certificate=rsa_certificate())
    assert set(SETUP.findall(sdp.answer_sdp)) == {answered}
    assert_echoed_tone(recording.audio)


async def test_an_ecdsa_caller_offering_actpass_is_answered_passive_and_is_the_dtls_client(echo_server):
    """aiortc's own caller (and every browser) offers actpass: the answer says passive, and the caller's
    transports take the client role from it."""
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("audio", direction="sendrecv")
        pc.createDataChannel("events")
        session = await connect(echo_server, pc)
        assert set(SETUP.findall(pc.remoteDescription.sdp)) == {"passive"}
        assert aiortc_compat.dtls_roles(session.pc) == {"server"}
        assert aiortc_compat.dtls_roles(pc) == {"client"}
    finally:
        await pc.close()


def test_rsa_twins_follow_each_ecdsa_suite_in_aiortcs_order():
    assert aiortc_compat._with_rsa_twins(["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-SHA"]) == (
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES256-SHA")


def test_allowing_rsa_peers_is_refused_not_skipped_when_aiortc_moves_its_context(monkeypatch):
    monkeypatch.delattr(RTCCertificate, "_create_ssl_context")
    with pytest.raises(aiortc_compat.AiortcChanged, match="_create_ssl_context"):
        aiortc_compat.allow_rsa_dtls_peers()


async def test_an_aiortc_that_ignores_the_answers_dtls_role_is_refused(monkeypatch):
    """If an aiortc upgrade stopped taking its DTLS role from the local answer, every call would quietly
    go back to `active` (and RSA callers to "no shared cipher"): answer_as_dtls_server says so instead."""
    offerer, answerer = RTCPeerConnection(), RTCPeerConnection()
    try:
        offerer.addTransceiver("audio")
        await offerer.setLocalDescription(await offerer.createOffer())
        await answerer.setRemoteDescription(offerer.localDescription)
        set_local = answerer.setLocalDescription

        async def set_local_ignoring_setup(description: RTCSessionDescription) -> None:
            await set_local(RTCSessionDescription(sdp=SETUP.sub("a=setup:active", description.sdp),
                                                  type=description.type))

        monkeypatch.setattr(answerer, "setLocalDescription", set_local_ignoring_setup)
        with pytest.raises(aiortc_compat.AiortcChanged, match="DTLS server role"):
            await aiortc_compat.answer_as_dtls_server(answerer)
    finally:
        await offerer.close()
        await answerer.close()


async def test_a_certificate_is_refused_once_the_transports_exist():
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("audio")
        with pytest.raises(ValueError, match="before"):
            aiortc_compat.use_certificate(pc, rsa_certificate())
    finally:
        await pc.close()
    assert aiortc.__version__.startswith(aiortc_compat.PINNED_AIORTC)
