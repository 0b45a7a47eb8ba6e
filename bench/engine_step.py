"""Time one engine step (Mimi encode + LM step + Mimi decode) per 80 ms frame, by batch size.

    ./run bench engine_step                      # tiny model on the CPU, batch 1, 2, 4, 8
    ./run bench engine_step --threads 2          # same, with 2 torch threads
    ./run bench engine_step --real-size          # moshiko's architecture with random weights,
                                                 # bf16 + CUDA graphs on CUDA: batch 1..64
                                                 # (the last line: the largest batch whose p99
                                                 # step fits in 80 ms = calls one GPU carries)

Every slot sends a frame at every step (the worst case). The figure that
matters is the real-time factor: median step time / 80 ms; under 1 keeps up.
Step times are measured around `MoshiStepper.step`, which returns host numpy
audio, so GPU work is finished when the clock stops.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from server.model_check import read_layout  # noqa: E402
from server.model_source import LoadedModel, ModelSource, load_model  # noqa: E402
from server.moshi_step import MoshiStepper, SamplingConfig  # noqa: E402
from server.persona_step import PersonaStepper  # noqa: E402

FRAME_MS = 80.0


class PlaceholderTokenizer:
    """Stands in for moshiko's 32k sentencepiece file (not on this machine); timing never reads text."""

    def __init__(self, size: int):
        self.size = size

    def vocab_size(self) -> int:
        return self.size

    def id_to_piece(self, token: int) -> str:
        return f"<{token}>"

    def is_control(self, token: int) -> bool:
        return False

    def encode(self, text: str) -> list[int]:
        """About one id per word piece, for sizing a persona prompt's replay; the ids mean nothing."""
        return [4 + len(word) for word in text.split() for _ in range(2)]


def real_size_model(
    device: torch.device, dtype: torch.dtype, lm_layers: int | None = None, persona: bool = False
) -> LoadedModel:
    """moshiko-pytorch-bf16's architecture (moshi's built-in 7B config) with random weights;
    `persona`: PersonaPlex's (the same with dep_q=16, so the depth transformer has 16 steps).

    `lm_layers` shrinks the main transformer for a smoke run of this code path on a small machine;
    such a run is not a real-size figure.
    """
    from moshi.models import loaders

    overrides = {} if lm_layers is None else {"num_layers": lm_layers}
    if persona:
        overrides["dep_q"] = 16
    name = "personaplex" if persona else "moshiko"
    name += "-architecture-random-weights" + ("" if lm_layers is None else f"-{lm_layers}-layers-SMOKE")
    mimi = loaders.get_mimi(None, device=device, num_codebooks=16 if persona else 8)
    lm = loaders.get_moshi_lm(None, device=device, dtype=dtype, lm_kwargs_overrides=overrides)
    return LoadedModel(name, mimi, lm, PlaceholderTokenizer(lm.text_card), True)


def time_batch(model: LoadedModel, batch: int, steps: int, warmup: int) -> dict:
    if read_layout(model.mimi, model.lm, model.text_tokenizer).takes_persona:
        stepper = PersonaStepper(model, batch, SamplingConfig())
    else:
        stepper = MoshiStepper(model, batch, SamplingConfig())
    stepper.warm_up()
    rng = np.random.default_rng(0)
    rows = np.ones(batch, dtype=bool)
    stepper.reset_slots(list(range(batch)), list(range(batch)))
    if model.lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        frames = (0.1 * rng.standard_normal((batch, stepper.frame_size))).astype(np.float32)
        started = time.perf_counter()
        stepper.step(frames, rows)
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - started))
    stepper.close()
    times.sort()
    median = statistics.median(times)
    result = {
        "batch": batch,
        "median_ms": round(median, 2),
        "p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))], 2),
        "rtf": round(median / FRAME_MS, 3),
        "per_call_ms": round(median / batch, 2),
    }
    if model.lm.device.type == "cuda":
        result["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-size", action="store_true", help="moshiko's architecture, random weights")
    parser.add_argument("--lm-layers", type=int, default=None, help="smoke runs only: fewer LM layers")
    parser.add_argument("--persona", action="store_true", help="with --real-size: PersonaPlex's dep_q=16 layout")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the one-core claim)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    default_batches = "1,2,4,8,16,32,64" if args.real_size else "1,2,4,8"
    batches = [int(b) for b in (args.batches or default_batches).split(",")]

    with torch.no_grad():
        if args.real_size:
            model = real_size_model(device, dtype, args.lm_layers, args.persona)
        else:
            model = load_model(ModelSource("tiny"), device, dtype)
        header = {
            "model": model.name,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(),
            "cuda_graphs": device.type == "cuda" and not os.environ.get("NO_CUDA_GRAPH"),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "steps": args.steps,
        }
        print(json.dumps(header))
        results = []
        for batch in batches:
            results.append(time_batch(model, batch, args.steps, args.warmup))
            print(json.dumps(results[-1]), flush=True)
        # Capacity: the largest batch whose p99 step still fits in one 80 ms frame.
        fitting = [r["batch"] for r in results if r["p99_ms"] < FRAME_MS]
        one = next((r for r in results if r["batch"] == 1), None)
        print(json.dumps({
            "calls_one_device_carries": max(fitting) if fitting else 0,
            "vs_batch_1": f"{max(fitting)}x the calls of batch 1 (the official server's only mode)"
            if fitting and one else None,
        }))


if __name__ == "__main__":
    main()
