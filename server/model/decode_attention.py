"""One query frame's attention over each slot's own KV entries, reading 8-bit entries as they are stored.

moshi hands `scaled_dot_product_attention` the whole ring of every slot with a
mask: the kernel reads all 3000 entries of every row whatever is filled, and
an int8 ring would first be widened to bf16 in memory (one more write and
read of the whole ring). Here each (slot, head) reads only its first
`lengths[slot]` entries, widening int8 values and applying their scales in
registers: a young call costs little, an int8 ring half the bytes of bf16.

On CUDA this is a Triton kernel (a loop over blocks of entries with an online
softmax); the lengths are read on the device, so one CUDA graph serves every
length. Elsewhere (the CPU) `reference` computes the same with torch. With
TRITON_INTERPRET=1 set before the kernel is first used, Triton's interpreter
runs the kernel on the CPU: that is how the tests check it without a GPU.
"""

from __future__ import annotations

import math
import os

import torch

BLOCK_N = 32  # entries per loop step

try:  # the CUDA build of torch brings triton; without it only `reference` runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - not with this project's torch
    triton = tl = None

_kernel = None


# The kernel and its reduction steps are plain functions here, jit-compiled on first use: Triton's own
# tl.sum, tl.max and tl.zeros are jit functions made when triton is imported, which its interpreter cannot
# call when that import came before TRITON_INTERPRET was set (as in a test run), so none of them is used.
def _add(a, b):
    return a + b


def _larger(a, b):
    return tl.maximum(a, b)


def _attend(q_ptr, cache_ptr, scale_ptr, length_ptr, out_ptr,
            q_b, q_h, c_kv, c_b, c_h, c_n, s_kv, s_b, s_h, o_b, o_h, softmax_scale,
            DIM: tl.constexpr, BLOCK: tl.constexpr, SCALED: tl.constexpr):
    """One program per (slot, head): an online softmax over blocks of the slot's first n entries."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.load(length_ptr + b).to(tl.int32)
    d = tl.arange(0, DIM)
    q = tl.load(q_ptr + b * q_b + h * q_h + d).to(tl.float32) * softmax_scale
    best = tl.full([], float("-inf"), tl.float32)
    total = tl.full([], 0.0, tl.float32)
    acc = tl.full([DIM], 0.0, tl.float32)
    keys = cache_ptr + b * c_b + h * c_h
    values = keys + c_kv
    for start in range(0, n, BLOCK):
        index = start + tl.arange(0, BLOCK)
        valid = index < n
        where = index[:, None] * c_n + d[None, :]
        k = tl.load(keys + where, mask=valid[:, None], other=0).to(tl.float32)
        v = tl.load(values + where, mask=valid[:, None], other=0).to(tl.float32)
        if SCALED:
            k_scale = tl.load(scale_ptr + b * s_b + h * s_h + index, mask=valid, other=0).to(tl.float32)
            v_scale = tl.load(scale_ptr + s_kv + b * s_b + h * s_h + index, mask=valid, other=0).to(tl.float32)
            k = k * k_scale[:, None]
            v = v * v_scale[:, None]
        scores = tl.where(valid, tl.reduce(k * q[None, :], 1, _add_jit), float("-inf"))
        new_best = tl.maximum(best, tl.reduce(scores, 0, _larger_jit))
        keep = tl.exp(best - new_best)
        weights = tl.exp(scores - new_best)
        total = total * keep + tl.reduce(weights, 0, _add_jit)
        acc = acc * keep + tl.reduce(weights[:, None] * v, 0, _add_jit)
        best = new_best
    out = acc / tl.where(total > 0, total, 1.0)  # a row with no entries (not executing) gets zeros
    tl.store(out_ptr + b * o_b + h * o_h + d, out.to(out_ptr.dtype.element_ty))


_add_jit = _larger_jit = None


def _build_kernel():
    global _add_jit, _larger_jit
    _add_jit, _larger_jit = triton.jit(_add), triton.jit(_larger)
    return triton.jit(_attend)


def kernel_available(device: torch.device) -> bool:
    """Whether `attend` runs the Triton kernel here (CUDA, or Triton's interpreter on the CPU)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def attend(q: torch.Tensor, cache: torch.Tensor, scales: torch.Tensor | None, lengths: torch.Tensor,
           bound: int) -> torch.Tensor:
    """Attention of `q` [B, H, D] over `cache` [2 (K, V), B, H, C, D] (int8 with `scales` [2, B, H, C, 1],
    else any float dtype), each row over its first `lengths[row]` entries. `bound`: no row has more
    (the reference reads only that many). Returns [B, H, D] in q's dtype; a row of length 0 gets zeros."""
    if kernel_available(q.device):
        return _attend_kernel(q, cache, scales, lengths)
    return reference(q, cache, scales, lengths, bound)


def _attend_kernel(q: torch.Tensor, cache: torch.Tensor, scales: torch.Tensor | None,
                   lengths: torch.Tensor) -> torch.Tensor:
    global _kernel
    if _kernel is None:
        _kernel = _build_kernel()
    _, batch, heads, _, dim = cache.shape
    if cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("attend needs the head dimension contiguous")
    out = torch.empty(batch, heads, dim, device=q.device, dtype=q.dtype)
    scale_arg = scales if scales is not None else lengths  # unused when unscaled
    s_kv, s_b, s_h = (scales.stride(0), scales.stride(1), scales.stride(2)) if scales is not None else (0, 0, 0)
    _kernel[(batch, heads)](
        q, cache, scale_arg, lengths, out,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
        s_kv, s_b, s_h, out.stride(0), out.stride(1), 1.0 / math.sqrt(dim),
        DIM=dim, BLOCK=BLOCK_N, SCALED=scales is not None,
    )
    return out


def reference(q: torch.Tensor, cache: torch.Tensor, scales: torch.Tensor | None, lengths: torch.Tensor,
              bound: int) -> torch.Tensor:
    """The same attention with torch operations, in float32."""
    keys, values = cache[0, :, :, :bound].float(), cache[1, :, :, :bound].float()
    if scales is not None:
        keys = keys * scales[0, :, :, :bound].float()
        values = values * scales[1, :, :, :bound].float()
    scores = torch.einsum("bhd,bhnd->bhn", q.float(), keys) / math.sqrt(q.shape[-1])
    filled = torch.arange(keys.shape[2], device=q.device)[None, :] < lengths[:, None]
    scores = scores.masked_fill(~filled[:, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row of length 0 gets zeros
    return torch.einsum("bhn,bhnd->bhd", weights, values).to(q.dtype)
