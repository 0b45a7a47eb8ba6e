"""Per-call random streams for moshi's token sampling, drawn on the model's device.

moshi samples every row of a batch from the one global torch generator, so a
call's sampled tokens would depend on who else is on the GPU and on what came
before it, and a per-call seed would mean nothing. Here each call slot has its
own stream.

How: moshi samples with the exponential trick (`probs / Exp(1)` then argmax)
inside `moshi.models.lm.sample_token`. We install a drop-in `sample_token`
that does the same arithmetic, but reads its Exp(1) noise from buffers that
the engine fills before each step. The noise of a slot's k-th step is a hash
of (the slot's seed, k, the value's index), computed for every slot at once
on the device with integer tensor operations: no per-slot work on the host,
no copy to the device, no sync (on an H100 the host-side draw it replaces, a
torch.Generator per slot, took 1.1-1.4 ms a step at 16 slots). A
slot's stream advances only on the steps it takes part in, so its tokens do
not depend on its neighbours. The buffers keep fixed addresses, so the
sampling inside moshi's CUDA graphs reads fresh noise at every replay.
Outside an engine step (or in greedy mode) the original function runs
unchanged.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import moshi.models.lm as moshi_lm
import numpy as np
import torch

_original_sample_token = moshi_lm.sample_token
_active = threading.local()


MASK32 = 0xFFFFFFFF


def _times(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(x * factor) mod 2**32 for 32-bit values in int64, in two halves so no product overflows."""
    low = x * (factor & 0xFFFF)
    high = ((x * (factor >> 16)) & 0xFFFF) << 16
    return (low + high) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds with Wellons' 'lowbias32' constants) of int64
    tensors holding values below 2**32: every input bit moves every output bit."""
    x = x ^ (x >> 16)
    x = _times(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _times(x, 0x846CA68B)
    return x ^ (x >> 16)


class SlotNoise:
    """One random stream per call slot, and the noise buffers one LM step consumes.

    A step samples the text token once and each of the dep_q audio codebooks
    once, in that order; each sampling site gets its own buffer of the shape
    its top-k probabilities have, `[B, 1, 1, k]`.
    """

    def __init__(self, batch_size: int, site_widths: list[int], device: torch.device):
        self.batch_size = batch_size
        self.site_widths = site_widths
        self._offsets = np.cumsum([0, *site_widths])
        self._flat = torch.ones(batch_size, int(self._offsets[-1]), device=device)
        self._index = torch.arange(int(self._offsets[-1]), device=device)[None, :]
        self._keys = torch.zeros(batch_size, dtype=torch.int64, device=device)  # each slot's hashed seed
        self._steps = torch.zeros(batch_size, dtype=torch.int64, device=device)  # steps each slot has drawn
        for slot in range(batch_size):
            self.seed(slot, slot)
        self._site = 0

    def seed(self, slot: int, seed: int) -> None:
        """Start `slot`'s stream afresh from `seed` (any int; 64 bits count)."""
        low, high = seed & MASK32, (seed >> 32) & MASK32
        key = mix32(torch.tensor(low) ^ mix32(torch.tensor(high) + 0x9E3779B9 & MASK32))
        self._keys[slot] = key.to(self._keys.device)
        self._steps[slot] = 0

    def _refill(self, rows: np.ndarray) -> None:
        """Draw this step's Exp(1) noise for every slot on the device; the streams of `rows` advance."""
        stream = mix32(self._keys ^ (self._steps & MASK32))[:, None]  # [B, 1]
        bits = mix32(stream ^ self._index)  # [B, width]
        uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # in (0, 1), 24 bits
        self._flat.copy_(-torch.log(uniform))
        advance = torch.from_numpy(np.ascontiguousarray(rows, dtype=bool)).to(self._steps.device)
        self._steps += advance

    def buffer(self, index: int) -> torch.Tensor:
        start, stop = int(self._offsets[index]), int(self._offsets[index + 1])
        return self._flat[:, start:stop].view(self.batch_size, 1, 1, stop - start)

    @contextlib.contextmanager
    def step(self, rows: np.ndarray) -> Iterator[None]:
        """Make moshi's sampling read this object's noise for one LM step."""
        self._refill(rows)
        self._site = 0
        _active.noise = self
        try:
            yield
        finally:
            _active.noise = None

    def next_buffer(self, shape: torch.Size) -> torch.Tensor:
        if self._site >= len(self.site_widths):
            raise RuntimeError("moshi sampled more often in one step than this engine expects")
        noise = self.buffer(self._site)
        if noise.shape != shape:
            raise RuntimeError(f"sampling site {self._site} has shape {tuple(shape)}, expected {tuple(noise.shape)}")
        self._site += 1
        return noise


def sample_token(
    logits: torch.Tensor, use_sampling: bool = False, temp: float = 1.0, top_k: int = 0, top_p: float = 0.0
) -> torch.Tensor:
    """moshi's `sample_token`, drawing its noise from the active SlotNoise when there is one."""
    noise_source: SlotNoise | None = getattr(_active, "noise", None)
    if noise_source is None or not use_sampling or temp <= 0.0 or top_p > 0.0:
        return _original_sample_token(logits, use_sampling, temp, top_k, top_p)
    probs = torch.softmax(logits / temp, dim=-1)
    if top_k > 0:
        probs, indices = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1)
    else:
        indices = None
    choice = (probs / noise_source.next_buffer(probs.shape)).argmax(dim=-1, keepdim=True)
    if indices is not None:
        choice = indices.gather(-1, choice)
    return choice[..., 0]


def install() -> None:
    """Route moshi's LM sampling through `sample_token` above (idempotent)."""
    moshi_lm.sample_token = sample_token


def sampling_site_widths(text_card: int, card: int, dep_q: int, top_k_text: int, top_k: int) -> list[int]:
    """The width of the probabilities at each sampling site of one step: text, then each codebook."""
    text = min(top_k_text, text_card) if top_k_text > 0 else text_card
    audio = min(top_k, card) if top_k > 0 else card
    return [text] + [audio] * dep_q
