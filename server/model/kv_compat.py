"""The LM's KV cache, our way: attention over the filled part of each slot's ring, 8-bit storage.

moshi 0.2.13's `RingKVCache` hands attention the whole ring (the 7B's 3000
frames, four minutes) at every step, for every slot, however young the call:
on an H100 that is the +0.66 ms per slot a step costs. Its storage is the
model's dtype (bf16: 1.485 GiB per slot at 7B size).

`KvOptions` replaces the main transformer's caches (never the depth
transformer's, never Mimi's); by default nothing is replaced.

- attention `window`: moshi's attention over the first L entries of every
  ring only, L the smallest bucket (a sixteenth, an eighth, a quarter, a half
  or all of the ring) covering the most filled ring among the slots that
  step. The host counts each slot's filled entries (`KvWindow`), so choosing L
  costs no device sync. Entries past a slot's fill are masked out anyway, so
  the result is the whole ring's, bit for bit. A ring that has wrapped is read
  whole: a full ring costs what it costs today. On CUDA each bucket has its
  own graph, captured during warm-up.
- attention `fused`: our own attention for one-frame steps
  (server.model.decode_attention), each slot over its own filled entries, the
  lengths counted on the device (one graph for all).
- storage `int8` (a scale per head and entry) or `fp8` (e4m3, clamped to its
  range): half the memory per slot. moshi's attention and the window widen
  them to the model's dtype in memory; the fused kernel reads them as stored.
  Evidence against the model's dtype: bench/kv_agreement.py.

This is the one place that knows moshi's cache class, the module global its
attention builds caches from, its attention's streaming state and LMGen's
private graph of the main transformer; all are checked against the pinned
moshi version.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from moshi.models.lm import LMGen, LMModel
from moshi.modules import transformer as moshi_transformer
from moshi.modules.transformer import KVCacheResult, RingKVCache
from moshi.utils.compile import CUDAGraphed

from . import decode_attention
from .moshi_compat import MoshiChanged, check_version

KV_STORAGES = ("model", "fp8", "int8")
KV_ATTENTIONS = ("ring", "window", "fused")
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
KV_DTYPES = {"fp8": FP8, "int8": torch.int8}  # storages other than the model's own dtype
WINDOW_FRACTIONS = (16, 8, 4, 2, 1)  # buckets: capacity / each, rounded up


@dataclass(frozen=True)
class KvOptions:
    """How the LM's main transformer keeps and reads its KV cache (see the module docstring)."""

    attention: str = "ring"
    storage: str = "model"
    bench_age: int = 0  # benchmarks only: every call starts this many frames old (3000: its ring full)

    def __post_init__(self) -> None:
        if self.attention not in KV_ATTENTIONS:
            raise ValueError(f"KV attention must be one of {', '.join(KV_ATTENTIONS)}, not {self.attention!r}")
        if self.storage not in KV_STORAGES:
            raise ValueError(f"KV cache storage must be one of {', '.join(KV_STORAGES)}, not {self.storage!r}")
        if self.attention == "fused" and self.storage == "fp8":
            raise ValueError("the fused attention reads int8 or the model's dtype, not fp8")
        if self.bench_age and (self.attention, self.storage) == ("ring", "model"):
            raise ValueError("calls made old for a benchmark need the stepper's own KV caches (an attention or "
                             "storage option); moshi's ring costs the same at any age")

    @property
    def window(self) -> bool:
        """Attention through moshi's SDPA over a window of buckets, one CUDA graph per bucket."""
        return self.attention == "window"

    @property
    def fused(self) -> bool:
        """Attention through our kernel, each slot over its own filled entries (decode_attention)."""
        return self.attention == "fused"

    def describe(self) -> str:
        reads = {"ring": "the whole ring", "window": "the filled window",
                 "fused": "each call's own filled entries (fused kernel)"}[self.attention]
        return f"KV cache: {self.storage} storage, attention over {reads}"


def window_buckets(capacity: int) -> list[int]:
    """The attention lengths a windowed step may use: fractions of the ring, ascending, the last the whole."""
    return sorted({-(-capacity // fraction) for fraction in WINDOW_FRACTIONS})


class KvWindow:
    """The host's count of each slot's filled ring entries, and the attention length of the next step.

    The count mirrors what the device's caches do, with no sync: a slot gains an entry each LM step it
    executes (up to the capacity: then the ring has wrapped) and loses them all when it is reset."""

    def __init__(self, batch_size: int, capacity: int, enabled: bool):
        self.batch_size = batch_size
        self.capacity = capacity
        self.enabled = enabled
        self.buckets = window_buckets(capacity) if enabled else [capacity]
        self.filled = np.zeros(batch_size, dtype=np.int64)
        self.length = self.buckets[-1]
        self.floor = 0  # warm-up: the least length a step uses
        self.used: set[int] = set()  # the lengths steps have used (each its own CUDA graph)

    def begin(self, rows: np.ndarray) -> int:
        """Choose the attention length for an LM step of `rows` (each writes one entry first)."""
        needed = int(np.minimum(self.filled[rows] + 1, self.capacity).max()) if rows.any() else 1
        needed = max(needed, self.floor)
        self.length = next(bucket for bucket in self.buckets if bucket >= needed)
        self.used.add(self.length)
        return self.length

    def end(self, rows: np.ndarray) -> None:
        self.filled[rows] = np.minimum(self.filled[rows] + 1, self.capacity)

    def reset(self, rows: np.ndarray) -> None:
        self.filled[rows] = 0

    @contextlib.contextmanager
    def at_least(self, length: int) -> Iterator[None]:
        """Steps inside use at least `length` (warm-up captures each bucket's graph this way)."""
        self.floor = length
        try:
            yield
        finally:
            self.floor = 0


class WindowedRingKVCache(RingKVCache):
    """moshi's ring cache, read over the window's length only (or by the fused kernel), stored in the model's
    dtype, int8 or fp8."""

    def __init__(self, batch_size: int, num_heads: int, dim_per_head: int, capacity: int,
                 window: KvWindow, storage: str, device: torch.device, dtype: torch.dtype):
        stored = KV_DTYPES.get(storage, dtype)
        super().__init__(batch_size, num_heads, dim_per_head, capacity, respect_exec_mask=True,
                         device=device, dtype=stored)
        self.window = window
        self.storage = storage
        self.compute_dtype = dtype
        # Scatter has no float8 kernels: fp8 entries are written through a byte view of the same memory.
        self._writable = self.cache.view(torch.uint8) if storage == "fp8" else self.cache
        # int8: one scale per entry and head (its largest magnitude / 127), 2 bytes per 128 values.
        self.scales = (torch.ones(2, batch_size, num_heads, capacity, 1, device=device, dtype=dtype)
                       if storage == "int8" else None)

    def _write(self, which: int, index: torch.Tensor, values: torch.Tensor) -> None:
        if self.storage == "fp8":
            values = values.clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)
        elif self.storage == "int8":
            scale = values.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127
            self.scales[which].scatter_(2, index[..., :1], scale.to(self.scales.dtype))
            values = (values / scale).round().clamp(-127, 127).to(torch.int8)
        self._writable[which].scatter_(2, index, values)

    def _read(self, which: int, length: int) -> torch.Tensor:
        values = self.cache[which, :, :, :length]
        if self.storage == "fp8":
            return values.to(self.compute_dtype)
        if self.storage == "int8":
            return values.to(self.compute_dtype) * self.scales[which, :, :, :length]
        return values

    def _write_entries(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this step's entries at each row's end; returns the index of the last one written [B, 1]."""
        batch, heads, steps, dim = k.shape
        end = self.end_offset.view(-1, 1)
        written = (torch.arange(steps, device=end.device) + end) % self.capacity  # [B, T]
        index = written.view(batch, 1, steps, 1).expand(-1, heads, steps, dim)
        self._write(0, index, k)
        self._write(1, index, v)
        return end + steps - 1

    def complete(self, k: torch.Tensor, v: torch.Tensor, exec_mask: torch.Tensor) -> KVCacheResult:
        """moshi's contract (for its scaled_dot_product_attention): keys, values and their positions."""
        steps = k.shape[2]
        length = self.window.length
        if steps != 1 and length < self.capacity:
            raise RuntimeError(f"a windowed KV cache takes one frame per step, got {steps}")
        last = self._write_entries(k, v)
        keys, values = self._read(0, length), self._read(1, length)
        # Positions as moshi computes them, over the first `length` entries only.
        indexes = torch.arange(length, device=last.device)
        delta = indexes - last % self.capacity
        positions = torch.where(delta <= 0, last + delta, last + delta - self.capacity)
        self.end_offset[:] = torch.where(exec_mask, self.end_offset + steps, self.end_offset)
        positions = torch.where(indexes >= self.end_offset.view(-1, 1), torch.full_like(positions, -1), positions)
        return KVCacheResult(keys, values, positions)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, exec_mask: torch.Tensor) -> torch.Tensor:
        """The fused path: write one frame's entries, then attend each row over its own filled entries
        (server.model.decode_attention). q, k, v: [B, H, 1, D]; returns [B, H, D]."""
        self._write_entries(k, v)
        self.end_offset[:] = torch.where(exec_mask, self.end_offset + 1, self.end_offset)
        lengths = self.end_offset.clamp(max=self.capacity)
        return decode_attention.attend(q[:, :, 0].contiguous(), self.cache, self.scales, lengths, self.window.length)


def fuse_attention(lm: LMModel) -> Callable[[], None]:
    """Run the main transformer's attention through `WindowedRingKVCache.attend` for one-frame steps
    (moshi's forward otherwise); returns what puts moshi's own forward back."""
    check_version()
    restore = []
    for layer in lm.transformer.layers:
        attention = layer.self_attn
        cache = getattr(getattr(attention, "_streaming_state", None), "kv_cache", None)
        if not isinstance(cache, WindowedRingKVCache):
            raise RuntimeError("fuse_attention needs the stepper's own KV caches (enter streaming in building_caches)")
        if attention.cross_attention or not attention.causal or attention.kv_repeat != 1 or attention.weights_per_step:
            raise MoshiChanged("the main transformer's attention is not plain causal self-attention")
        attention.forward = functools.partial(_fused_forward, attention, cache, attention.forward)
        restore.append(attention)

    def put_back() -> None:
        for attention in restore:
            del attention.forward  # the instance attribute: the class's forward shows through again
    return put_back


def _fused_forward(attention: Any, cache: WindowedRingKVCache, moshi_forward: Callable[..., torch.Tensor],
                   query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """moshi's StreamingMultiheadAttention.forward for a streaming one-frame step, with our attention."""
    state = attention._streaming_state
    batch, steps = query.shape[:2]
    if state is None or steps != 1:
        return moshi_forward(query, key, value)
    heads = attention.num_heads
    projected = attention.in_projs[0](query)  # [B, 1, 3 * H * D]
    q, k, v = projected.view(batch, 1, 3, heads, -1).permute(2, 0, 3, 1, 4)  # each [B, H, 1, D]
    if attention.rope:
        q, k = attention.rope(q, k, state.offset, time_before_heads=False)
    x = cache.attend(q, k, v, state.exec_mask)  # [B, H, D]
    x = attention.out_projs[0](x.reshape(batch, 1, -1))
    state.offset[:] = torch.where(state.exec_mask, state.offset + 1, state.offset)
    state.offset_cpu += 1
    return x


def main_capacity(lm: LMModel) -> int:
    """The main transformer's ring length (its attention context, in frames)."""
    context = lm.transformer.layers[0].self_attn.context
    if not isinstance(context, int) or context < 1:
        raise MoshiChanged(f"the LM's attention context is {context!r}: moshi's streaming KV cache needs an int")
    return context


@contextlib.contextmanager
def building_caches(window: KvWindow, storage: str) -> Iterator[None]:
    """While inside, the LM's main transformer builds `WindowedRingKVCache`s (enter the generator's streaming
    here); other caches (the depth transformer's, one per depth step) stay moshi's own."""
    check_version()
    original = getattr(moshi_transformer, "RingKVCache", None)
    if original is not RingKVCache:
        raise MoshiChanged("moshi.modules.transformer.RingKVCache (the class attention builds caches from) changed")

    def build(batch_size: int, num_heads: int, dim_per_head: int, capacity: int, respect_exec_mask: bool = True,
              device: torch.device = torch.device("cuda"), dtype: torch.dtype = torch.bfloat16) -> RingKVCache:  # noqa: B008
        if respect_exec_mask and capacity == window.capacity:
            if batch_size != window.batch_size:
                raise RuntimeError(f"KV cache for {batch_size} rows, window for {window.batch_size}")
            return WindowedRingKVCache(batch_size, num_heads, dim_per_head, capacity, window, storage, device, dtype)
        return RingKVCache(batch_size, num_heads, dim_per_head, capacity, respect_exec_mask, device, dtype)

    moshi_transformer.RingKVCache = build
    try:
        yield
    finally:
        moshi_transformer.RingKVCache = original


class GraphsByWindow:
    """A CUDA graph per attention length: a captured graph bakes in the length its caches read."""

    def __init__(self, func: Callable[..., Any], window: KvWindow, disable: bool):
        self.func = func
        self.window = window
        self.disable = disable
        self.graphs: dict[int, CUDAGraphed] = {}

    def __call__(self, *args: Any) -> Any:
        graph = self.graphs.get(self.window.length)
        if graph is None:
            graph = self.graphs[self.window.length] = CUDAGraphed(self.func, disable=self.disable)
        return graph(*args)


def graph_main_by_window(generator: LMGen, window: KvWindow) -> None:
    """Give a streaming LMGen one graph of its main transformer per window length (LMGen's private state)."""
    check_version()
    state = getattr(generator, "_streaming_state", None)
    graphed = getattr(state, "graphed_main", None)
    if not isinstance(graphed, CUDAGraphed) or graphed.func != generator.lm_model.forward_text:
        raise MoshiChanged("LMGen's streaming state no longer keeps `graphed_main` (its main transformer's graph)")
    state.graphed_main = GraphsByWindow(graphed.func, window, disable=graphed.disable)


def windowed_caches(lm: LMModel) -> list[WindowedRingKVCache]:
    """The main transformer's caches, when they are ours (for tests and benchmarks)."""
    found = []
    for layer in lm.transformer.layers:
        state = getattr(layer.self_attn, "_streaming_state", None)
        cache = getattr(state, "kv_cache", None)
        if isinstance(cache, WindowedRingKVCache):
            found.append(cache)
    return found


def kv_bytes_per_slot(lm: LMModel) -> int:
    """What one slot's main-transformer KV cache holds in memory, scales included: ours, or moshi's ring
    (layers x K and V x dim x context x the model's bytes per value)."""
    caches = windowed_caches(lm)
    if caches:
        total = sum(c.cache.nbytes + (c.scales.nbytes if c.scales is not None else 0) for c in caches)
        return total // caches[0].cache.shape[1]
    itemsize = torch.finfo(lm.dtype).bits // 8
    return len(lm.transformer.layers) * 2 * lm.dim * main_capacity(lm) * itemsize


def age_slots(lm: LMModel, window: KvWindow, frames: int, rows: np.ndarray | None = None) -> None:
    """Make slots (`rows`, default all) look `frames` frames old to the main transformer (benchmarks: a call
    past four minutes reads its whole ring). Their ring entries are zeroed, never another call's: only the
    cost is real."""
    check_version()
    caches = windowed_caches(lm)
    if not caches:
        raise RuntimeError("age_slots needs the stepper's own KV caches (KvOptions)")
    selected = torch.ones(window.batch_size, dtype=torch.bool) if rows is None else torch.from_numpy(rows)
    selected = selected.to(caches[0].end_offset.device)
    for layer in lm.transformer.layers:
        state = getattr(layer.self_attn, "_streaming_state", None)
        if state is None or not isinstance(getattr(state, "offset", None), torch.Tensor):
            raise MoshiChanged("moshi's attention streaming state no longer keeps a per-row `offset`")
        state.offset[selected] = frames
    for cache in caches:
        cache.end_offset[selected] = frames
        cache.cache[:, selected] = 0
    window.filled[selected.cpu().numpy()] = min(frames, window.capacity)
