"""What crosses between a media worker and the engine process: one message per datagram.

Workers and the engine talk over a Unix SOCK_SEQPACKET socket each, so every
send is one whole message and no framing is needed. Frames and results, the
only traffic that scales with calls, use fixed little-endian headers followed by
raw float32 samples (1920 per 80 ms frame at 24 kHz): no pickling, one copy.
Rarer control messages (open a call, its answer, status) are small pickled
dicts; both ends are this package, started from the same install.

    FRAME   worker -> engine   call_id, seq, samples
    RESULT  engine -> worker   call_id, seq, flags, input/output rms, step ms, samples, text
    DROPPED engine -> worker   call_id, seq          (the engine dropped that frame: bounded delay)
    CONTROL either way         pickled dict with a "kind"
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass

import numpy as np

FRAME, RESULT, DROPPED, CONTROL = 1, 2, 3, 4
_FRAME = struct.Struct("<BII")  # kind, call_id, seq
_RESULT = struct.Struct("<BIIBfffH")  # kind, call_id, seq, flags, input rms, output rms, step ms, text bytes
_DROPPED = struct.Struct("<BII")
_SILENT, _HAS_TEXT = 1, 2
MAX_MESSAGE = 64 * 1024  # a frame is 7.7 kB; room for a long persona in a control message


class WireError(ValueError):
    """A message that does not parse: the peer is not speaking this protocol (or is broken)."""


@dataclass
class WireResult:
    call_id: int
    seq: int
    audio: np.ndarray
    text: str | None
    silent: bool
    input_rms: float
    output_rms: float
    step_ms: float


def frame_message(call_id: int, seq: int, samples: np.ndarray) -> bytes:
    return _FRAME.pack(FRAME, call_id, seq) + np.ascontiguousarray(samples, dtype="<f4").tobytes()


def result_message(call_id: int, seq: int, audio: np.ndarray, text: str | None, silent: bool,
                   input_rms: float, output_rms: float, step_ms: float) -> bytes:
    encoded = b"" if text is None else text.encode("utf-8")[:4096]
    flags = (_SILENT if silent else 0) | (_HAS_TEXT if text is not None else 0)
    header = _RESULT.pack(RESULT, call_id, seq, flags, input_rms, output_rms, step_ms, len(encoded))
    return header + np.ascontiguousarray(audio, dtype="<f4").tobytes() + encoded


def dropped_message(call_id: int, seq: int) -> bytes:
    return _DROPPED.pack(DROPPED, call_id, seq)


def control_message(kind: str, **fields) -> bytes:
    return bytes([CONTROL]) + pickle.dumps({"kind": kind, **fields}, protocol=pickle.HIGHEST_PROTOCOL)


def kind_of(message: bytes) -> int:
    if not message:
        raise WireError("an empty message")
    return message[0]


def parse_frame(message: bytes, frame_size: int) -> tuple[int, int, np.ndarray]:
    """(call_id, seq, samples); the samples are a fresh array the engine may keep."""
    expected = _FRAME.size + 4 * frame_size
    if len(message) != expected:
        raise WireError(f"a frame message is {expected} bytes, got {len(message)}")
    _, call_id, seq = _FRAME.unpack_from(message)
    return call_id, seq, np.frombuffer(message, "<f4", frame_size, _FRAME.size).astype(np.float32)


def parse_result(message: bytes, frame_size: int) -> WireResult:
    if len(message) < _RESULT.size + 4 * frame_size:
        raise WireError(f"a result message is too short ({len(message)} bytes)")
    _, call_id, seq, flags, input_rms, output_rms, step_ms, text_bytes = _RESULT.unpack_from(message)
    audio_end = _RESULT.size + 4 * frame_size
    if len(message) != audio_end + text_bytes:
        raise WireError("a result message's length does not match its text length")
    audio = np.frombuffer(message, "<f4", frame_size, _RESULT.size).astype(np.float32)
    text = message[audio_end:].decode("utf-8", errors="replace") if flags & _HAS_TEXT else None
    return WireResult(call_id, seq, audio, text, bool(flags & _SILENT), input_rms, output_rms, step_ms)


def parse_dropped(message: bytes) -> tuple[int, int]:
    if len(message) != _DROPPED.size:
        raise WireError("a dropped message has the wrong length")
    _, call_id, seq = _DROPPED.unpack(message)
    return call_id, seq


def parse_control(message: bytes) -> dict:
    try:
        fields = pickle.loads(message[1:])
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a broken peer
        raise WireError(f"a control message does not unpickle: {exc}") from None
    if not isinstance(fields, dict) or "kind" not in fields:
        raise WireError("a control message is not a dict with a kind")
    return fields
