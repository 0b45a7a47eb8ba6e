"""Time one engine step (Mimi encode + LM step + Mimi decode) per 80 ms frame, by batch size.

    ./run bench engine_step                      # tiny model on the CPU, batch 1, 2, 4, 8
    ./run bench engine_step --threads 2          # same, with 2 torch threads
    ./run bench engine_step --real-size          # moshiko's architecture with random weights; on CUDA:
                                                 # bf16 + CUDA graphs, batch 1..64 as memory allows
    ./run bench engine_step --real-size --persona            # PersonaPlex's (dep_q 16), + prompt replay speed
    ./run bench engine_step --real-size --profile 16         # where one step's time goes, at batch 16
    ./run bench engine_step --real-size --kv ring,window,window-int8 --ages 0,3000
                                                 # the KV cache options side by side, fresh calls and calls
                                                 # past four minutes (every slot's ring full)

Every slot sends a frame at every step (the worst case). Step times are
measured around `MoshiStepper.step`, which returns host numpy audio, so GPU
work is finished when the clock stops. Per batch: median and p99 step, the
real-time factor (median / 80 ms) and, on CUDA, peak GPU memory. The summary
names the largest batch whose p99 stays under 60 ms (20 ms of headroom under
the 80 ms frame for the event loop and jitter): the calls one GPU carries,
set against batch 1, the official server's only mode, and against the
KV-cache estimate of how many slots fit in memory.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from server.model.check import read_layout  # noqa: E402
from server.model.decode_attention import kernel_available  # noqa: E402
from server.model.kv_compat import KvOptions, age_slots, kv_bytes_per_slot  # noqa: E402
from server.model.moshi_step import MoshiStepper, SamplingConfig  # noqa: E402
from server.model.persona_step import PersonaStepper, VoiceOptions, synthetic_voices  # noqa: E402
from server.model.random_model import RANDOM_MOSHIKO, RANDOM_PERSONAPLEX, build_random_model  # noqa: E402
from server.model.source import LoadedModel, ModelSource, load_model  # noqa: E402

FRAME_MS = 80.0
HEADROOM_MS = 60.0
GIB = 2**30
KV_VARIANTS = {
    "ring": KvOptions(),  # moshi's own cache: the whole ring in the model's dtype (today)
    "window": KvOptions("window"),
    "fused": KvOptions("fused"),
    "int8": KvOptions(storage="int8"),
    "window-int8": KvOptions("window", "int8"),
    "fused-int8": KvOptions("fused", "int8"),
    "fp8": KvOptions(storage="fp8"),
    "window-fp8": KvOptions("window", "fp8"),
}


def stepper_class(model: LoadedModel) -> type[MoshiStepper]:
    return PersonaStepper if read_layout(model.mimi, model.lm, model.text_tokenizer).takes_persona else MoshiStepper


def make_stepper(
    model: LoadedModel, batch: int, cls: type[MoshiStepper] | None = None, kv: KvOptions = KV_VARIANTS["ring"]
) -> MoshiStepper:
    cls = cls or stepper_class(model)
    if issubclass(cls, PersonaStepper):
        return cls(model, batch, SamplingConfig(), voices=VoiceOptions(synthetic=synthetic_voices()), kv=kv)
    return cls(model, batch, SamplingConfig(), kv=kv)


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def frames_for(batch: int, frame_size: int, rng: np.random.Generator) -> np.ndarray:
    return (0.1 * rng.standard_normal((batch, frame_size))).astype(np.float32)


def timed_steps(stepper: MoshiStepper, rows: np.ndarray, rng: np.random.Generator, count: int) -> list[float]:
    """Milliseconds of each of `count` steps of fresh random frames in `rows`."""
    times = []
    for _ in range(count):
        frames = frames_for(stepper.batch_size, stepper.frame_size, rng)
        started = time.perf_counter()
        stepper.step(frames, rows)
        times.append(1000 * (time.perf_counter() - started))
    return times


def time_batch(model: LoadedModel, batch: int, steps: int, warmup: int, busy: bool = False,
               kv: str = "ring", age: int = 0) -> dict:
    """`kv`: a KV_VARIANTS name; `age`: frames every slot has already been in its call (a windowed cache
    reads more of an older ring; moshi's whole ring costs the same at any age)."""
    on_cuda = model.lm.device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    stepper = make_stepper(model, batch, kv=KV_VARIANTS[kv])
    try:
        stepper.warm_up()
        rng = np.random.default_rng(0)
        rows = np.ones(batch, dtype=bool)
        stepper.reset_slots(list(range(batch)), list(range(batch)))
        if age and KV_VARIANTS[kv] != KV_VARIANTS["ring"]:
            age_slots(model.lm, stepper.kv_window, age)  # every slot, its ring zeroed
        kv_bytes = kv_bytes_per_slot(model.lm)
        with busy_thread(busy):
            timed_steps(stepper, rows, rng, warmup)
            times = timed_steps(stepper, rows, rng, steps)
    finally:
        stepper.close()
    times.sort()
    median = statistics.median(times)
    result = {
        "batch": batch,
        "kv": kv,
        "age_frames": age,
        "kv_gib_per_slot": round(kv_bytes / GIB, 3),
        "median_ms": round(median, 2),
        "p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))], 2),
        "max_ms": round(times[-1], 2),
        "rtf": round(median / FRAME_MS, 3),
        "per_call_ms": round(median / batch, 2),
    }
    if on_cuda:
        result["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    return result


# -- where a step's time goes ----------------------------------------------------------------------


class PhaseClock:
    """Wall time per named phase, each phase closed by a device synchronize so GPU work is counted."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ms: dict[str, list[float]] = defaultdict(list)
        self.recording = False

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.recording:
            yield
            return
        self.sync()
        started = time.perf_counter()
        with torch.profiler.record_function(name):
            yield
        self.sync()
        self.ms[name].append(1000 * (time.perf_counter() - started))


def timed_stepper_class(base: type[MoshiStepper], clock: PhaseClock) -> type[MoshiStepper]:
    """`base` with its three device phases and the noise refill each timed by `clock`."""

    class Timed(base):
        def _encode(self, frames, rows):
            with clock.phase("mimi_encode"):
                return super()._encode(frames, rows)

        def _generate(self, user_codes, rows, prompt_rows, outputs):
            with clock.phase("lm_step (incl. noise refill)"):
                return super()._generate(user_codes, rows, prompt_rows, outputs)

        def _decode(self, audio_codes, rows):
            with clock.phase("mimi_decode (incl. copy to host)"):
                return super()._decode(audio_codes, rows)

        @contextlib.contextmanager
        def _sampling_noise(self, rows):
            inner = super()._sampling_noise(rows)
            with clock.phase("noise_refill"):
                inner.__enter__()
            try:
                yield
            finally:
                inner.__exit__(None, None, None)

    return Timed


def profile(model: LoadedModel, batch: int, steps: int) -> dict:
    """Phase wall times with graphs (synchronised per phase), then the GPU kernel time split by network
    from an eager profile (graph replays hide which kernels belong to which module)."""
    from moshi.utils.compile import no_cuda_graph

    device = model.lm.device
    clock = PhaseClock(device)
    stepper = make_stepper(model, batch, timed_stepper_class(stepper_class(model), clock))
    report: dict = {"batch": batch}
    try:
        stepper.warm_up()
        rng = np.random.default_rng(1)
        rows = np.ones(batch, dtype=bool)
        stepper.reset_slots(list(range(batch)), list(range(batch)))
        timed_steps(stepper, rows, rng, 5)
        # 1. Unsynchronised steps: the real step time.
        report["step_ms_median"] = round(statistics.median(timed_steps(stepper, rows, rng, steps)), 2)
        # 2. Synchronised phases (graphs on).
        clock.recording = True
        total = timed_steps(stepper, rows, rng, steps)
        clock.recording = False
        phases = {name: round(statistics.median(ms), 2) for name, ms in clock.ms.items()}
        phases["synced_step_total"] = round(statistics.median(total), 2)
        device_phases = sum(v for k, v in phases.items() if k.startswith(("mimi", "lm")))
        phases["host_rest (codes check, routing, text, masks)"] = round(phases["synced_step_total"] - device_phases, 2)
        report["graphed_phases_ms"] = phases
        # 3. GPU kernel time with graphs: busy share of the step.
        if device.type == "cuda":
            report["graphed_gpu_kernel_ms_per_step"] = gpu_kernel_ms(stepper, rng, batch, steps)
        # 4. Eager kernel time per network.
        if device.type == "cuda":
            with no_cuda_graph():
                report["eager_gpu_ms_per_step"] = eager_split(stepper, model, rng, batch, steps)
    finally:
        stepper.close()
    return report


def gpu_kernel_ms(stepper: MoshiStepper, rng: np.random.Generator, batch: int, steps: int) -> float | None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    rows = np.ones(batch, dtype=bool)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            stepper.step(frames_for(batch, stepper.frame_size, rng), rows)
        torch.cuda.synchronize()
    return kernel_ms(prof, steps)


def eager_split(stepper: MoshiStepper, model: LoadedModel, rng: np.random.Generator, batch: int, steps: int) -> dict:
    """Kernel time per network (module hooks open a profiler range around each)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    lm, mimi = model.lm, model.mimi
    modules = {"backbone (temporal transformer)": lm.transformer, "depth transformer": lm.depformer,
               "mimi encoder (SEANet)": mimi.encoder, "mimi decoder (SEANet)": mimi.decoder}
    if mimi.encoder_transformer is not None:
        modules["mimi encoder transformer"] = mimi.encoder_transformer
        modules["mimi decoder transformer"] = mimi.decoder_transformer
    ranges: dict[int, list] = defaultdict(list)
    handles = []
    for name, module in modules.items():
        def enter(mod, args, name=name):
            ranges[id(mod)].append(torch.profiler.record_function(name).__enter__())

        def leave(mod, args, out):
            ranges[id(mod)].pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    rows = np.ones(batch, dtype=bool)
    try:
        for _ in range(3):
            stepper.step(frames_for(batch, stepper.frame_size, rng), rows)
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                stepper.step(frames_for(batch, stepper.frame_size, rng), rows)
            torch.cuda.synchronize()
        wall = 1000 * (time.perf_counter() - started) / steps
    finally:
        for handle in handles:
            handle.remove()
    split: dict[str, float] = defaultdict(float)
    for event in prof.events():  # CPU-side ranges: the kernels each one launched, children included
        if event.device_type == torch.autograd.DeviceType.CPU and event.name in modules:
            split[event.name] += event.device_time_total / 1000.0 / steps
    report = {name: round(ms, 2) for name, ms in split.items()}
    report["all kernels"] = kernel_ms(prof, steps, skip=set(modules))
    report["eager step wall (profiled)"] = round(wall, 2)
    return report


def kernel_ms(prof, steps: int, skip: set[str] | None = None) -> float | None:
    """Milliseconds of GPU kernels per step in a profile, or None where the profiler saw none.
    `skip`: range names, which the profiler also lists on the GPU's timeline (spans, not kernels)."""
    kernels = [e for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and e.name not in (skip or set())]
    return round(sum(e.device_time_total for e in kernels) / 1000.0 / steps, 2) if kernels else None


# -- prompt replay (PersonaPlex) ---------------------------------------------------------------------


def prompt_replay(model: LoadedModel, batch: int) -> dict:
    """Prompt-only steps with every slot replaying the default persona: steps per second, and how
    many times faster than real time (one step replays 80 ms of prompt for every slot at once)."""
    stepper = make_stepper(model, batch)
    try:
        stepper.warm_up()
        plan = stepper.prompt_book.plan(None)
        stepper.reset_slots(list(range(batch)), list(range(batch)))
        for slot in range(batch):
            stepper.start_prompt(slot, plan)
        silence = np.zeros((batch, stepper.frame_size), dtype=np.float32)
        idle = np.zeros(batch, dtype=bool)
        steps = 0
        started = time.perf_counter()
        while stepper.prompting_rows().any():
            stepper.step(silence, idle)
            steps += 1
        seconds = time.perf_counter() - started
    finally:
        stepper.close()
    per_second = steps / seconds
    return {
        "prompt_batch": batch,
        "prompt_steps": steps,
        "prompt_seconds": round(seconds, 2),
        "prompt_steps_per_s": round(per_second, 1),
        "prompt_x_real_time": round(per_second * FRAME_MS / 1000, 2),
    }


@contextlib.contextmanager
def busy_thread(enabled: bool):
    """Pure Python work in a second thread while the block runs: it takes the GIL whenever a step gives
    it up (every torch op does) and keeps it until the switch interval forces it out."""
    if not enabled:
        yield
        return
    import threading

    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(i * i for i in range(1000))

    thread = threading.Thread(target=spin, name="busy", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# -- main ----------------------------------------------------------------------------------------------


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
    parser.add_argument("--profile", type=int, default=None, metavar="BATCH",
                        help="instead of the sweep: where one step's time goes at this batch")
    parser.add_argument("--prompt-batches", default="1", help="with --persona: batches for the prompt replay speed")
    parser.add_argument("--busy-thread", action="store_true",
                        help="while steps are timed, a second Python thread that never waits, as a saturated "
                             "event loop: what sharing the GIL costs the inference thread")
    parser.add_argument("--switch-interval-ms", type=float, default=None,
                        help="Python's GIL switch interval (default 5 ms)")
    parser.add_argument("--kv", default="ring",
                        help=f"KV cache variants, side by side per batch: {', '.join(KV_VARIANTS)}")
    parser.add_argument("--ages", default="0", help="frames every slot is into its call, e.g. 0,3000 (3000: a full "
                                                    "ring, a call past four minutes); moshi's ring runs once")
    args = parser.parse_args()
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    default_batches = "1,2,4,8,16,24,32,48,64" if args.real_size else "1,2,4,8"
    batches = [int(b) for b in (args.batches or default_batches).split(",")]

    with torch.no_grad():
        if args.real_size:
            name = RANDOM_PERSONAPLEX if args.persona else RANDOM_MOSHIKO
            model = build_random_model(name, device, dtype, lm_layers=args.lm_layers)
        else:
            model = load_model(ModelSource("tiny-persona" if args.persona else "tiny"), device, dtype)
        header = {
            "model": model.name,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda_graphs": device.type == "cuda" and not os.environ.get("NO_CUDA_GRAPH"),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "steps": args.steps,
            "busy_thread": args.busy_thread,
            "switch_interval_ms": 1000 * sys.getswitchinterval(),
            "kv_cache_gib_per_slot": round(kv_bytes_per_slot(model.lm) / GIB, 3),  # moshi's ring
            "fused_attention": "triton kernel" if kernel_available(device) else "torch reference",
        }
        if device.type == "cuda":
            header["weights_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 2)
            header["gpu_total_gib"] = round(torch.cuda.get_device_properties(device).total_memory / GIB, 1)
        print(json.dumps(header), flush=True)

        if args.profile is not None:
            print(json.dumps(profile(model, args.profile, args.steps)), flush=True)
            return

        variants = [(kv, age) for kv in args.kv.split(",") for age in
                    ([0] if kv == "ring" else [int(a) for a in args.ages.split(",")])]
        unknown = {kv for kv, _ in variants} - set(KV_VARIANTS)
        if unknown:
            parser.error(f"unknown --kv {', '.join(sorted(unknown))}")
        results = []
        out_of_memory: set[tuple[str, int]] = set()
        for batch in batches:
            for kv, age in variants:  # side by side at each batch: machines drift
                if (kv, age) in out_of_memory:
                    continue
                try:
                    results.append(time_batch(model, batch, args.steps, args.warmup, args.busy_thread, kv, age))
                except torch.OutOfMemoryError as exc:
                    print(json.dumps({"batch": batch, "kv": kv, "age_frames": age,
                                      "out_of_memory": str(exc).splitlines()[0][:200]}), flush=True)
                    out_of_memory.add((kv, age))
                    free_device_memory()
                    continue
                print(json.dumps(results[-1]), flush=True)
                free_device_memory()
        summary = {f"{kv} age {age}": capacity_summary([r for r in results if (r["kv"], r["age_frames"]) == (kv, age)],
                                                       header)
                   for kv, age in variants}
        summary["median_vs_ring"] = ratios_to_ring(results)
        if args.persona:
            for batch in [int(b) for b in args.prompt_batches.split(",")]:
                try:
                    summary.setdefault("prompt_replay", []).append(prompt_replay(model, batch))
                except torch.OutOfMemoryError:
                    break
                free_device_memory()
        print(json.dumps(summary), flush=True)


def ratios_to_ring(results: list[dict]) -> dict:
    """Each variant's median step over moshi's ring at the same batch, in the same run."""
    ring = {r["batch"]: r["median_ms"] for r in results if r["kv"] == "ring"}
    return {f'{r["kv"]} age {r["age_frames"]} batch {r["batch"]}': round(r["median_ms"] / ring[r["batch"]], 3)
            for r in results if r["kv"] != "ring" and r["batch"] in ring}


def capacity_summary(results: list[dict], header: dict) -> dict:
    within = [r["batch"] for r in results if r["p99_ms"] < HEADROOM_MS]
    within_frame = [r["batch"] for r in results if r["p99_ms"] < FRAME_MS]
    summary: dict = {
        "calls_one_device_carries_p99_under_60ms": max(within) if within else 0,
        "largest_batch_p99_under_80ms": max(within_frame) if within_frame else 0,
        "vs_batch_1": f"{max(within)}x the calls of batch 1 (the official server's only mode)" if within else None,
    }
    if "weights_gib" in header and results and "gpu_peak_gib" in results[-1]:
        largest = results[-1]
        per_slot = (largest["gpu_peak_gib"] - header["weights_gib"]) / largest["batch"]
        summary["measured_gib_per_slot"] = round(per_slot, 3)
        summary["slots_that_fit_by_kv_estimate"] = int((header["gpu_total_gib"] - header["weights_gib"])
                                                       // largest["kv_gib_per_slot"])
        summary["slots_that_fit_by_measured_per_slot"] = int((header["gpu_total_gib"] - header["weights_gib"])
                                                             // per_slot) if per_slot > 0 else None
    return summary


if __name__ == "__main__":
    main()
