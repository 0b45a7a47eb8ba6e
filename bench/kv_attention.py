"""One attention layer's KV read at the 7B's size, by KV option and call age: what the options change.

    ./run bench kv_attention                      # CPU: batch 8, ages 100 and 3000 frames
    ./run bench kv_attention --device cuda --batch 64

One frame of one layer (32 heads of 128, a 3000-frame ring), every slot the same age: moshi's ring
(`RingKVCache.complete` and `scaled_dot_product_attention` with its mask, as its attention does), the
window, and the fused path (the Triton kernel on CUDA, its torch reference elsewhere), each in the model's
dtype and int8. Median of `--steps` after a warm-up, taken side by side. The whole step is
bench/engine_step.py's job; this isolates the part the options touch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from moshi.modules.transformer import RingKVCache  # noqa: E402

from server.model.decode_attention import kernel_available  # noqa: E402
from server.model.kv_compat import KvWindow, WindowedRingKVCache  # noqa: E402

HEADS, HEAD_DIM, RING = 32, 128, 3000


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(name: str, batch: int, age: int, steps: int, device: torch.device, dtype: torch.dtype) -> float:
    """Median milliseconds of one frame's cache write and attention for `batch` slots `age` frames old."""
    attention, _, storage = name.partition("-")
    storage = storage or "model"
    window = KvWindow(batch, RING, enabled=attention != "ring")
    if name == "ring":
        cache = RingKVCache(batch, HEADS, HEAD_DIM, RING, device=device, dtype=dtype)
    else:
        cache = WindowedRingKVCache(batch, HEADS, HEAD_DIM, RING, window, storage, device, dtype)
    cache.end_offset.fill_(age)
    window.filled[:] = min(age, RING)
    executing = torch.ones(batch, dtype=torch.bool, device=device)
    rows = np.ones(batch, dtype=bool)
    times = []
    for step in range(steps + 3):
        q, k, v = (torch.randn(batch, HEADS, 1, HEAD_DIM, device=device, dtype=dtype) for _ in range(3))
        window.begin(rows)
        sync(device)
        started = time.perf_counter()
        if attention == "fused":
            cache.attend(q, k, v, executing)
        else:
            keys, values, positions = cache.complete(k, v, executing)
            mask = (positions >= 0)[:, None, None, :]  # moshi's causal bias reduces to this for one frame
            F.scaled_dot_product_attention(q, keys, values, mask)
        sync(device)
        window.end(rows)
        if step >= 3:
            times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ages", default="100,3000")
    parser.add_argument("--variants", default="ring,window,fused,ring-int8,window-int8,fused-int8")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    header = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "batch": args.batch, "fused": "triton kernel"
              if kernel_available(device) else "torch reference",
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    print(json.dumps(header), flush=True)
    with torch.no_grad():
        for age in [int(a) for a in args.ages.split(",")]:
            row = {"age_frames": age}
            for name in args.variants.split(","):
                row[name] = round(time_variant(name, args.batch, age, args.steps, device, dtype), 3)
            ring = row.get("ring")
            if ring:
                row["vs_ring"] = {k: round(v / ring, 3) for k, v in row.items() if k not in ("age_frames", "ring")}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
