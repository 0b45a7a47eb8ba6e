"""Measuring mouth-to-ear delay through the `echo` engine with identifiable tone bursts.

Burst i is a 40 ms tone at `base_hz + i * step_hz`, so a burst heard back names
itself: delays are matched to the right burst even when some are dropped or the
delay exceeds the gap between bursts. Used by the bounded-delay test and the
load benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BurstPlan:
    count: int = 30
    every_s: float = 1.0
    lead_s: float = 0.5
    base_hz: float = 300.0
    step_hz: float = 60.0
    level: float = 0.4

    def sent_at(self, burst: int) -> float:
        """Seconds from the start of the audio to the start of burst `burst`."""
        return self.lead_s + burst * self.every_s

    def audio(self, rate: int = 48000) -> np.ndarray:
        audio = np.zeros(int((self.lead_s + self.count * self.every_s) * rate), np.float32)
        n = int(0.04 * rate)
        window = np.hanning(n)
        for i in range(self.count):
            start = int(self.sent_at(i) * rate)
            hz = self.base_hz + (i % self.distinct) * self.step_hz
            audio[start : start + n] = self.level * window * np.sin(2 * np.pi * hz * np.arange(n) / rate)
        return audio

    @property
    def distinct(self) -> int:
        """Frequencies repeat after this many bursts (all stay under 3 kHz, where Opus keeps tones)."""
        return min(self.count, int((3000 - self.base_hz) // self.step_hz))

    def delays(
        self, chunks: list[np.ndarray], arrivals: list[float], start: float, rate: int = 24000
    ) -> dict[int, float]:
        """Burst number -> mouth-to-ear delay, from a recording of 20 ms chunks and their arrival times.

        `start` is when the sent audio began to play (time.monotonic). A tone that repeats is
        taken as the latest burst with that tone sent before it arrived (delays stay far below
        the repeat period).
        """
        delays: dict[int, float] = {}
        levels = [float(np.sqrt(np.mean(c.astype(np.float64) ** 2))) for c in chunks]
        i = 0
        while i < len(chunks):
            if levels[i] < 0.02:
                i += 1
                continue
            j = i
            while j < len(chunks) and levels[j] >= 0.02:
                j += 1
            sound = np.concatenate(chunks[max(0, i - 1) : j + 1])
            spectrum = np.abs(np.fft.rfft(sound * np.hanning(sound.size), n=8 * sound.size))
            hz = float(np.fft.rfftfreq(8 * sound.size, 1 / rate)[np.argmax(spectrum)])
            tone = round((hz - self.base_hz) / self.step_hz)
            if 0 <= tone < self.distinct and abs(hz - (self.base_hz + tone * self.step_hz)) < self.step_hz / 3:
                elapsed = arrivals[i] - start
                sent = [b for b in range(tone, self.count, self.distinct) if self.sent_at(b) <= elapsed]
                if sent:
                    delays.setdefault(sent[-1], elapsed - self.sent_at(sent[-1]))
            i = j
        return delays
