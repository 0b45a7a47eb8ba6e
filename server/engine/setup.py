"""Wiring: from a model source and options to a ready-to-start Engine.

The stepper (model load, LMGen, streaming state, CUDA graphs) is built by a
factory that the engine runs on its own inference thread, so the event loop
never loads or runs the model.
"""

from __future__ import annotations

import functools
import logging

import torch

from ..model import moshi_compat
from ..model.check import default_device, default_dtype, read_layout
from ..model.echo_step import EchoStepper
from ..model.kv_compat import KvOptions
from ..model.moshi_step import MoshiStepper, SamplingConfig
from ..model.persona_step import PersonaStepper, VoiceOptions, synthetic_voices
from ..model.source import ModelSource, load_model
from ..model.stepper import Stepper
from .engine import Engine

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000


def build_stepper(
    source: ModelSource,
    max_calls: int,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    sampling: SamplingConfig | None = None,
    frame_size: int | None = None,
    echo_delay_frames: int = 1,
    cpu_threads: int | None = None,
    voices: VoiceOptions | None = None,
    kv: KvOptions | None = None,
) -> Stepper:
    """`cpu_threads`: torch threads for a CPU model; leave a core to the event loop, which runs
    every call's Opus, SRTP and pacing (see docs/BENCHMARKS.md).
    `voices`: the voice library of a PersonaPlex-style model; refused for a model that takes none.
    `kv`: how the LM keeps and reads its KV cache (server.model.kv_compat); the echo engine has none."""
    if max_calls < 1:
        raise ValueError("max_calls must be at least 1")
    if source.is_echo:
        return EchoStepper(max_calls, frame_size=frame_size or 1920, sample_rate=SAMPLE_RATE,
                           delay_frames=echo_delay_frames)
    torch_device = torch.device(device) if device is not None else default_device()
    torch_dtype = dtype if dtype is not None else default_dtype(torch_device)
    if torch_device.type == "cpu":
        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
        moshi_compat.disable_torch_compile()  # compiling costs more start-up than it ever saves on a CPU
    model = load_model(source, torch_device, torch_dtype)
    layout = read_layout(model.mimi, model.lm, model.text_tokenizer)
    if layout.takes_persona:
        if voices is None:
            voices = VoiceOptions(synthetic=synthetic_voices(SAMPLE_RATE) if model.is_test_model else None)
        return PersonaStepper(model, max_calls, sampling or SamplingConfig(), sample_rate=SAMPLE_RATE,
                              frame_size=frame_size, voices=voices, kv=kv or KvOptions())
    if voices is not None:
        raise ValueError(f"{model.name} is a {layout.kind} model: it takes no persona, so voices cannot be used")
    return MoshiStepper(model, max_calls, sampling or SamplingConfig(), sample_rate=SAMPLE_RATE,
                        frame_size=frame_size, kv=kv or KvOptions())


def create_engine(source: ModelSource, max_calls: int = 1, max_backlog_frames: int = 3, **options) -> Engine:
    """An Engine for `source`; `await engine.start()` loads and warms it up. Options: see build_stepper."""
    return Engine(functools.partial(build_stepper, source, max_calls, **options), max_backlog_frames=max_backlog_frames)
