"""Outbound audio: the model's voice as a paced WebRTC track.

aiortc's sender calls `recv()` in a loop and does not pace by pts, so this
track sleeps until each 20 ms frame is due by the wall clock, stamps pts as a
running sample count, and sends silence while the model has nothing. Its
buffer is bounded: when the model's audio backs up (the network or the sender
fell behind), the oldest audio is dropped and counted, so latency cannot grow
without end. Standing delay is shed too: after the model catches up from a slow
patch, its backlog arrives in a burst and would otherwise sit in the buffer,
played late, for the rest of the call. When the buffer has not fallen below
`max_standing_ms` for a whole second, the excess is dropped.

With `align_to_pushes`, the 20 ms send slots follow the model's frames (see
`SendPhase`): a frame is sent as soon as it arrives rather than at the next slot
of a grid fixed by the first `recv()`, which saved about 20 ms per call.

Frames leave as s16 *stereo* with both channels equal: aiortc's Opus encoder
works in stereo, and FFmpeg's mono to stereo upmix puts each channel 3 dB
down, which the caller would hear as a quieter voice.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections import deque

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack


class SendPhase:
    """Where the 20 ms send slots sit relative to the frames pushed into the track.

    Two rules keep the slots just after the frames arrive. When a pushed frame has
    waited more than `margin_s` before its first sample goes out, for every push of a
    second, the slots move earlier (by at most `max_step_s` at a time, so the caller's
    jitter buffer sees only a small shift). When a slot comes with nothing buffered
    just after audio has been flowing, the track waits up to `grace_s` for the late
    frame and the slots move later by what it waited, instead of sending 20 ms of
    silence and holding every later frame a slot longer.
    """

    def __init__(self, pushes_per_window: int = 12, margin_s: float = 0.003, max_step_s: float = 0.01,
                 grace_s: float = 0.015):
        self.pushes_per_window, self.margin_s, self.max_step_s, self.grace_s = (
            pushes_per_window, margin_s, max_step_s, grace_s)
        self._pushes = 0
        self._least_wait = float("inf")
        self.advanced_s = 0.0  # totals, for the stats
        self.delayed_s = 0.0

    def on_push(self, wait_s: float) -> float:
        """`wait_s`: how long the pushed frame's first sample will wait for its slot.
        Returns how much earlier the slots should move now (0 most of the time)."""
        self._least_wait = min(self._least_wait, wait_s)
        self._pushes += 1
        if self._pushes < self.pushes_per_window:
            return 0.0
        step = min(self._least_wait - self.margin_s, self.max_step_s)
        self._pushes, self._least_wait = 0, float("inf")
        if step <= 0:
            return 0.0
        self.advanced_s += step
        return step

    def on_late(self, waited_s: float) -> None:
        """A slot waited `waited_s` for a late frame: the slots have moved later by that much."""
        self.delayed_s += waited_s
        self._pushes, self._least_wait = 0, float("inf")  # the window starts again from the new phase


class OutboundAudioTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(
        self,
        sample_rate: int = 24000,
        frame_ms: int = 20,
        max_buffer_ms: int = 1000,
        max_standing_ms: int | None = None,
        end_when_drained: bool = False,
        align_to_pushes: bool = False,
    ):
        """`max_standing_ms`: shed delay that stays above this for a second (None: never).
        `end_when_drained`: end the track once its audio is sent (a caller playing a file), not send silence.
        `align_to_pushes`: move the send slots to follow the pushed frames (`SendPhase`)."""
        super().__init__()
        self.phase = SendPhase() if align_to_pushes else None
        self._pushed = asyncio.Event()
        self._last_push_at: float | None = None
        self.end_when_drained = end_when_drained
        self.max_standing_samples = None if max_standing_ms is None else sample_rate * max_standing_ms // 1000
        self._frames_per_window = 1000 // frame_ms
        self._window_frames = 0
        self._window_min = 0
        self.sample_rate = sample_rate
        self.samples_per_frame = sample_rate * frame_ms // 1000
        self.max_buffer_samples = sample_rate * max_buffer_ms // 1000
        self._time_base = fractions.Fraction(1, sample_rate)
        self._chunks: deque[np.ndarray] = deque()
        self._buffered = 0
        self._pts = 0
        self._clock_start: float | None = None
        self.frames_sent = 0
        self.silent_frames = 0
        self.samples_dropped = 0

    @property
    def clock_start(self) -> float | None:
        """When the first frame was asked for (time.monotonic); frames are due every 20 ms after it."""
        return self._clock_start

    @property
    def buffered_samples(self) -> int:
        return self._buffered

    def push(self, audio: np.ndarray) -> None:
        """Queue float32 mono samples in [-1, 1] at the track's rate; drops the oldest past the bound.
        NaN and infinite samples become silence and the rest is clipped: a listener never gets noise bursts
        from a cast of NaN to int16."""
        if audio.size == 0:
            return
        samples = np.asarray(audio, dtype=np.float32).reshape(-1)
        if not np.isfinite(samples).all() or np.abs(samples).max() > 1.0:
            samples = np.clip(np.nan_to_num(samples, nan=0.0, posinf=0.0, neginf=0.0), -1.0, 1.0)
        if self.phase is not None:
            now = time.monotonic()
            if self._clock_start is not None:
                wait = self._due() - now + self._buffered / self.sample_rate
                self._clock_start -= self.phase.on_push(max(wait, 0.0))
            self._last_push_at = now
        self._chunks.append(samples)
        self._buffered += audio.size
        self._drop_oldest(self._buffered - self.max_buffer_samples)
        self._pushed.set()

    def restart_clock(self) -> None:
        """A new sender reads from now on (a resumed call): pace from its first frame, not from the old
        sender's, which would let the frames of the time away out in a burst. Timestamps carry on."""
        self._clock_start = None

    def _due(self) -> float:
        """When the next frame is due to go out (time.monotonic)."""
        return self._clock_start + self._pts / self.sample_rate

    async def _wait_for_late_frame(self, due: float) -> None:
        """Nothing buffered at a slot while audio has been flowing: give the late frame `grace_s`."""
        if self.phase is None or self._last_push_at is None or due - self._last_push_at > 0.2:
            return
        self._pushed.clear()
        try:
            await asyncio.wait_for(self._pushed.wait(), self.phase.grace_s)
        except TimeoutError:
            return
        waited = max(time.monotonic() - due, 0.0)
        self._clock_start += waited
        self.phase.on_late(waited)

    def _shed_standing_delay(self) -> None:
        """Once a second: drop what stayed buffered all along beyond `max_standing_ms`."""
        if self.max_standing_samples is None:
            return
        self._window_min = min(self._window_min, self._buffered) if self._window_frames else self._buffered
        self._window_frames += 1
        if self._window_frames >= self._frames_per_window:
            self._drop_oldest(self._window_min - self.max_standing_samples)
            self._window_frames = 0

    def _drop_oldest(self, count: int) -> None:
        while count > 0 and self._chunks:
            oldest = self._chunks[0]
            if oldest.size <= count:
                self._chunks.popleft()
                dropped = oldest.size
            else:
                self._chunks[0] = oldest[count:]
                dropped = count
            self._buffered -= dropped
            self.samples_dropped += dropped
            count -= dropped

    def _take(self, count: int) -> np.ndarray | None:
        """`count` samples from the buffer, zero-padded; None when it holds nothing."""
        if self._buffered == 0:
            return None
        out = np.zeros(count, dtype=np.float32)
        filled = 0
        while filled < count and self._chunks:
            chunk = self._chunks[0]
            n = min(count - filled, chunk.size)
            out[filled : filled + n] = chunk[:n]
            filled += n
            if n == chunk.size:
                self._chunks.popleft()
            else:
                self._chunks[0] = chunk[n:]
        self._buffered -= filled
        return out

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._clock_start is None:  # the first frame, or the first to a new sender (restart_clock)
            self._clock_start = now - self._pts / self.sample_rate
        due = self._due()
        if due > now:
            await asyncio.sleep(due - now)
        if self._buffered == 0:
            await self._wait_for_late_frame(due)
        samples = self._take(self.samples_per_frame)
        self._shed_standing_delay()
        if samples is None and self.end_when_drained:
            self.stop()
            raise MediaStreamError
        if samples is None:
            samples = np.zeros(self.samples_per_frame, dtype=np.float32)
            self.silent_frames += 1
        pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.repeat(pcm, 2)[None, :], format="s16", layout="stereo")
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        frame.time_base = self._time_base
        self._pts += self.samples_per_frame
        self.frames_sent += 1
        return frame


class SenderTrack(MediaStreamTrack):
    """One peer connection's view of a call's outbound track. aiortc's sender stops the track it sends when
    its connection closes; a call resumed on a new connection (server.media.handover) must keep its track,
    its buffered reply and its timestamps, so each connection gets one of these and stops only it."""

    kind = "audio"

    def __init__(self, source: OutboundAudioTrack):
        super().__init__()
        self.source = source

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        return await self.source.recv()
