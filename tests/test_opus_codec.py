"""libopus through ctypes (the build PyAV ships): decoding, in-band FEC and concealment, levels kept."""

from __future__ import annotations

import contextlib
import fractions

import av
import numpy as np
import pytest

from server.media.opus_codec import OpusDecoder, OpusError, libopus_version

RATE = 48000


def encode(signal: np.ndarray, layout: str = "mono", fec: bool = True, loss_percent: int = 20) -> list[bytes]:
    """20 ms Opus packets of a 48 kHz float signal, from libopus through PyAV (as a browser would send)."""
    codec = av.CodecContext.create("libopus", "w")
    codec.bit_rate, codec.format, codec.layout, codec.sample_rate = 32000, "s16", layout, RATE
    codec.time_base = fractions.Fraction(1, RATE)
    codec.options = {"application": "voip", "fec": "1" if fec else "0", "packet_loss": str(loss_percent)}
    channels = 2 if layout == "stereo" else 1
    pcm = (np.clip(signal, -1, 1) * 32767).astype(np.int16)
    packets = []
    for i in range(len(pcm) // 960):
        chunk = np.repeat(pcm[i * 960 : (i + 1) * 960], channels)[None, :]
        frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout=layout)
        frame.sample_rate, frame.pts = RATE, i * 960
        packets += [bytes(p) for p in codec.encode(frame)]
    return packets


def tone(seconds: float, hz: float = 440.0, dbfs: float = -20.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (10 ** (dbfs / 20) * np.sqrt(2) * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def dbfs(x: np.ndarray) -> float:
    return 20 * np.log10(np.sqrt(np.mean(x.astype(np.float64) ** 2)) + 1e-12)


def test_it_is_libopus_from_pyavs_wheel_or_the_system():
    assert libopus_version().startswith("libopus")


@pytest.mark.parametrize("layout", ["mono", "stereo"])
def test_packets_decode_at_24_khz_mono_with_their_level(layout):
    packets = encode(tone(1.0), layout=layout)
    decoder = OpusDecoder(24000)
    out = np.concatenate([decoder.decode(p) for p in packets])
    assert len(out) == 24000 * len(packets) // 50  # 480 samples per 20 ms packet
    assert decoder.samples_in(packets[10]) == 480
    assert abs(dbfs(out[4800:]) - -20.0) < 1.0  # stereo is downmixed by libopus without a level change
    spectrum = np.abs(np.fft.rfft(out[4800:]))
    assert abs(np.argmax(spectrum) * 24000 / len(out[4800:]) - 440) < 5


def test_a_lost_packet_comes_back_from_the_next_packets_fec():
    packets = encode(tone(1.0, hz=300))
    reference = OpusDecoder(24000)
    expected = [reference.decode(p) for p in packets]
    decoder = OpusDecoder(24000)
    # libopus adds FEC to some packets only (after voiced frames, when the bitrate allows): lose the packet
    # before one that carries it.
    lost = next(i for i in range(20, len(packets) - 1) if decoder.has_fec(packets[i + 1]))
    for p in packets[:lost]:
        decoder.decode(p)
    recovered = decoder.decode_fec(packets[lost + 1], 480)
    assert len(recovered) == 480
    assert abs(dbfs(recovered) - dbfs(expected[lost])) < 3  # the lost 20 ms, at its level
    correlation = np.corrcoef(recovered, expected[lost])[0, 1]
    assert correlation > 0.5
    assert len(decoder.decode(packets[lost + 1])) == 480  # and the stream goes on


def test_without_fec_a_loss_is_concealed_not_silent():
    packets = encode(tone(1.0), fec=False)
    decoder = OpusDecoder(24000)
    for p in packets[:30]:
        decoder.decode(p)
    assert not decoder.has_fec(packets[31])
    concealed = decoder.conceal(480)
    assert len(concealed) == 480 and dbfs(concealed) > -30  # extrapolated, not hard silence


@pytest.mark.parametrize("payload", [b"\xff" * 3, b"\x00", bytes(range(256)) * 8, b"\x0b"])
def test_garbage_is_refused_and_the_decoder_goes_on(payload):
    packets = encode(tone(0.2))
    decoder = OpusDecoder(24000)
    decoder.decode(packets[0])
    with contextlib.suppress(OpusError):  # some of these happen to parse as tiny Opus packets
        decoder.decode(payload)
    out = decoder.decode(packets[1])
    assert len(out) == 480 and np.isfinite(out).all()
    with pytest.raises(OpusError):
        decoder.decode(b"")
    with pytest.raises(ValueError):
        OpusDecoder(44100)


# -- the sender side (server.media.aiortc_compat): what aiortc's sender runs per 20 ms frame ------------------


def s16_frame(pcm: np.ndarray, layout: str, rate: int = 24000) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout=layout)
    frame.sample_rate = rate
    return frame


def test_the_native_audio_level_is_aiortcs_to_the_bit():
    from server.media.aiortc_compat import _AIORTC_AUDIO_LEVEL, audio_level_dbov

    rng = np.random.default_rng(3)
    cases = [np.zeros(960, np.int16), np.full(960, 32767, np.int16), np.full(960, -32768, np.int16),
             np.ones(960, np.int16)]
    cases += [(rng.standard_normal(960) * 10 ** rng.uniform(-1, 4.5)).clip(-32768, 32767).astype(np.int16)
              for _ in range(300)]
    for pcm in cases:
        for layout, samples in (("stereo", pcm), ("mono", pcm[:480])):
            frame = s16_frame(samples, layout)
            assert audio_level_dbov(frame) == _AIORTC_AUDIO_LEVEL(frame)


@pytest.mark.parametrize("fmt", ["s16", "s16p", "flt", "fltp"])
@pytest.mark.parametrize("layout", ["mono", "stereo"])
def test_the_senders_downmix_averages_channels_exactly(fmt, layout):
    from server.media.aiortc_compat import _mono_float

    rng = np.random.default_rng(5)
    channels = 2 if layout == "stereo" else 1
    planes = rng.integers(-32768, 32768, size=(channels, 480)).astype(np.int16)
    if fmt.startswith("flt"):
        planes = (planes / 32768.0).astype(np.float32)
    data = planes if fmt.endswith("p") else planes.T.reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout=layout)
    expected = planes.astype(np.float32) / (32768.0 if fmt.startswith("s16") else 1.0)
    mono = _mono_float(frame)
    assert mono.dtype == np.float32
    np.testing.assert_array_equal(mono, expected.mean(axis=0))


def test_the_sender_encodes_on_the_loop_with_aiortcs_contract():
    import asyncio

    from server.media.aiortc_compat import OpusSenderEncoder, _InlineEncodeLoop

    async def main():
        loop = _InlineEncodeLoop(asyncio.get_running_loop())
        encoder = OpusSenderEncoder()
        pcm = (tone(0.02 * 3, dbfs=-20.0)[::2] * 32767).astype(np.int16)  # 24 kHz, 3 frames
        stamps = []
        for i in range(3):
            future = loop.run_in_executor(None, encoder.encode, s16_frame(np.repeat(pcm[i * 480:(i + 1) * 480], 2),
                                                                          "stereo"), False)
            assert future.done()
            payloads, timestamp = await future
            assert len(payloads) == 1 and OpusDecoder(24000).samples_in(payloads[0]) == 480
            stamps.append(timestamp)
        assert stamps == [0, 960, 1920]  # 48 kHz RTP clock
        failing = loop.run_in_executor(None, encoder.encode, "not a frame")
        with pytest.raises(AttributeError):
            await failing
        assert loop.is_running() and loop.get_debug() == asyncio.get_running_loop().get_debug()  # delegated

    asyncio.run(main())
