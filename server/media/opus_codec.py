"""Opus decoding for the receive path: libopus itself, for what FFmpeg's wrapper cannot do.

A lost packet is best recovered from the in-band FEC (LBRR) data that the
next packet may carry, else concealed by libopus's packet loss concealment.
FFmpeg's libopus decoder, which aiortc and PyAV use, offers neither: an empty
packet means "end of stream" to FFmpeg, and it never asks libopus for FEC.
So this module calls libopus directly, through ctypes, in the build that
PyAV ships in its wheel (`av.libs/libopus-*.so`, libopus 1.5+), falling back
to the system's libopus. No codec is written here: three libopus calls.

The decoder runs at the engine's rate (24 kHz) and in mono: libopus decodes
any Opus stream at 8, 12, 16, 24 or 48 kHz and downmixes stereo itself, so
the receive path needs no resampler. The encoder (the model's voice to the
caller) is libopus too, for the same reason: in-band FEC whose expected loss
follows the caller's receiver reports, which FFmpeg's wrapper fixes at open.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path

import av
import numpy as np

OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
MAX_FRAME_S = 0.12  # the longest Opus packet: 120 ms


class OpusError(ValueError):
    """libopus refused a packet (corrupt, truncated, not Opus)."""


@functools.lru_cache(maxsize=1)
def libopus() -> ctypes.CDLL:
    """libopus as PyAV ships it, else the system's; the functions used here, typed."""
    bundled = sorted((Path(av.__file__).resolve().parent.parent / "av.libs").glob("libopus*.so*"))
    name = str(bundled[0]) if bundled else ctypes.util.find_library("opus")
    if name is None:
        raise OSError("no libopus: neither in PyAV's wheel (av.libs) nor on the system (apt install libopus0)")
    lib = ctypes.CDLL(name)
    lib.opus_decoder_create.restype = ctypes.c_void_p
    lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_decode_float.restype = ctypes.c_int
    lib.opus_decode_float.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32,
                                      ctypes.POINTER(ctypes.c_float), ctypes.c_int, ctypes.c_int]
    lib.opus_packet_has_lbrr.restype = ctypes.c_int
    lib.opus_packet_has_lbrr.argtypes = [ctypes.c_char_p, ctypes.c_int32]
    lib.opus_packet_get_nb_samples.restype = ctypes.c_int
    lib.opus_packet_get_nb_samples.argtypes = [ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32]
    lib.opus_strerror.restype = ctypes.c_char_p
    lib.opus_strerror.argtypes = [ctypes.c_int]
    lib.opus_get_version_string.restype = ctypes.c_char_p
    lib.opus_encoder_create.restype = ctypes.c_void_p
    lib.opus_encoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.opus_encoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_encode_float.restype = ctypes.c_int32
    lib.opus_encode_float.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,  # state, float pcm, samples
                                      ctypes.c_char_p, ctypes.c_int32]
    lib.opus_encoder_ctl.restype = ctypes.c_int  # variadic: (state, request, int)
    return lib


def libopus_version() -> str:
    return libopus().opus_get_version_string().decode()


class OpusDecoder:
    """One call's Opus decoder: float32 mono at `sample_rate`. Not thread-safe; one per stream."""

    def __init__(self, sample_rate: int = 24000):
        self._state = None
        if sample_rate not in OPUS_RATES:
            raise ValueError(f"Opus decodes at {OPUS_RATES} Hz, not {sample_rate}")
        self.sample_rate = sample_rate
        self._lib = libopus()
        error = ctypes.c_int(0)
        self._state = self._lib.opus_decoder_create(sample_rate, 1, ctypes.byref(error))
        if error.value != 0 or not self._state:
            raise OSError(f"opus_decoder_create: {self._lib.opus_strerror(error.value).decode()}")
        self._max_samples = int(MAX_FRAME_S * sample_rate)
        self._pcm = (ctypes.c_float * self._max_samples)()
        self._pcm_view = np.ctypeslib.as_array(self._pcm)  # made once: as_array costs more than a decode call

    def close(self) -> None:
        if self._state:
            self._lib.opus_decoder_destroy(self._state)
            self._state = None

    def __del__(self) -> None:
        self.close()

    def samples_in(self, payload: bytes) -> int:
        """How many samples (at this decoder's rate) a packet holds; raises OpusError if it is not Opus."""
        count = self._lib.opus_packet_get_nb_samples(payload, len(payload), self.sample_rate)
        if count < 0:
            raise OpusError(f"not an Opus packet: {self._lib.opus_strerror(count).decode()}")
        return count

    def has_fec(self, payload: bytes) -> bool:
        """Whether a packet carries in-band FEC for the packet before it."""
        return bool(payload) and self._lib.opus_packet_has_lbrr(payload, len(payload)) == 1

    def decode(self, payload: bytes) -> np.ndarray:
        """A packet's audio; OpusError for a corrupt or truncated one (the decoder's state stays usable)."""
        if not payload:
            raise OpusError("empty Opus packet")
        return self._run(payload, self._max_samples, fec=False)

    def decode_fec(self, next_payload: bytes, samples: int) -> np.ndarray:
        """The lost packet before `next_payload`, `samples` long, from its in-band FEC (libopus conceals
        instead when it carries none: check `has_fec` first)."""
        return self._run(next_payload, samples, fec=True)

    def conceal(self, samples: int) -> np.ndarray:
        """`samples` of packet loss concealment: libopus extrapolates from what it decoded last."""
        return self._run(None, samples, fec=False)

    def _run(self, payload: bytes | None, samples: int, fec: bool) -> np.ndarray:
        if not self._state:
            raise OpusError("the decoder is closed")
        samples = min(samples, self._max_samples)
        length = len(payload) if payload else 0
        count = self._lib.opus_decode_float(self._state, payload, length, self._pcm, samples, int(fec))
        if count < 0:
            raise OpusError(f"opus_decode_float: {self._lib.opus_strerror(count).decode()}")
        return self._pcm_view[:count].copy()


# libopus's encoder requests (opus_defines.h)
_APPLICATION_VOIP = 2048
_SET_BITRATE = 4002
_SET_COMPLEXITY = 4010
_SET_INBAND_FEC = 4012
_SET_PACKET_LOSS_PERC = 4014
_SET_DTX = 4016


class OpusEncoder:
    """Mono Opus for a voice, 20 ms packets. Choices, deliberately: mono (the model speaks mono at 24 kHz;
    stereo would double the bits for nothing), 32 kbit/s (browsers' default for mono voice, ample for
    24 kHz speech), in-band FEC on with the expected loss set from what the caller reports (libopus adds
    FEC only when loss is expected, so a clean link pays nothing), DTX off (the model's voice is
    continuous, and DTX gaps would look like loss to the caller's jitter buffer)."""

    def __init__(self, sample_rate: int = 24000, bitrate: int = 32000, expected_loss_percent: int = 0):
        self._state = None
        if sample_rate not in OPUS_RATES:
            raise ValueError(f"Opus encodes at {OPUS_RATES} Hz, not {sample_rate}")
        self.sample_rate = sample_rate
        self.frame_samples = sample_rate // 50
        self._lib = libopus()
        error = ctypes.c_int(0)
        self._state = self._lib.opus_encoder_create(sample_rate, 1, _APPLICATION_VOIP, ctypes.byref(error))
        if error.value != 0 or not self._state:
            raise OSError(f"opus_encoder_create: {self._lib.opus_strerror(error.value).decode()}")
        for request, value in ((_SET_BITRATE, bitrate), (_SET_COMPLEXITY, 9), (_SET_INBAND_FEC, 1), (_SET_DTX, 0)):
            self._ctl(request, value)
        self.expected_loss_percent = -1
        self.set_expected_loss(expected_loss_percent)
        self._out = ctypes.create_string_buffer(1500)

    def _ctl(self, request: int, value: int) -> None:
        status = self._lib.opus_encoder_ctl(ctypes.c_void_p(self._state), ctypes.c_int(request), ctypes.c_int(value))
        if status != 0:
            raise OSError(f"opus_encoder_ctl({request}, {value}): {self._lib.opus_strerror(status).decode()}")

    def set_expected_loss(self, percent: float) -> None:
        """The packet loss the caller reports, so libopus spends bits on FEC only when it helps."""
        percent = int(min(100, max(0, round(percent))))
        if percent != self.expected_loss_percent and self._state:
            self._ctl(_SET_PACKET_LOSS_PERC, percent)
            self.expected_loss_percent = percent

    def encode(self, samples: np.ndarray) -> bytes:
        """One 20 ms frame (`frame_samples` float32 samples in [-1, 1]) to one Opus packet."""
        if len(samples) != self.frame_samples:
            raise ValueError(f"Opus frames here are {self.frame_samples} samples, got {len(samples)}")
        pcm = np.ascontiguousarray(samples, dtype=np.float32)
        count = self._lib.opus_encode_float(self._state, pcm.ctypes.data, self.frame_samples, self._out,
                                            len(self._out))
        if count < 0:
            raise OpusError(f"opus_encode_float: {self._lib.opus_strerror(count).decode()}")
        return ctypes.string_at(self._out, count)

    def close(self) -> None:
        if self._state:
            self._lib.opus_encoder_destroy(self._state)
            self._state = None

    def __del__(self) -> None:
        self.close()
