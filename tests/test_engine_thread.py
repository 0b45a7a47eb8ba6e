"""The event loop never runs the model; frames in are float32 PCM; every frame is measured."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import FRAME, noise_frames, run_call, tone_frames
from moshi.models.compression import MimiModel
from moshi.models.lm import LMGen

from server.engine import EngineNotReady, check_frame
from server.engine.setup import create_engine
from server.model.moshi_step import GREEDY
from server.model.source import ModelSource


async def test_all_model_work_runs_on_the_engines_inference_thread(monkeypatch):
    threads: set[str] = set()

    def spy(cls, name):
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            threads.add(threading.current_thread().name)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    for cls, name in [(MimiModel, "encode"), (MimiModel, "decode"), (MimiModel, "reset_streaming"),
                      (LMGen, "step"), (LMGen, "reset_streaming"), (LMGen, "__init__")]:
        spy(cls, name)
    loop_thread = threading.current_thread().name
    engine = create_engine(ModelSource("tiny"), max_calls=2, sampling=GREEDY)
    await engine.start()
    results = await run_call(engine, noise_frames(1, 6))
    await engine.stop()
    assert any(not r.silent for r in results)
    assert threads == {"moshi-inference"} and loop_thread not in threads


async def test_calls_wait_for_warm_up():
    engine = create_engine(ModelSource("tiny"), max_calls=1, sampling=GREEDY)
    with pytest.raises(EngineNotReady):
        await engine.open_call()
    await engine.start()
    assert engine.ready and engine.stats.steps == 0  # warm-up steps are not call steps
    call = await engine.open_call()
    await call.close()
    await engine.stop()
    with pytest.raises(EngineNotReady):
        await engine.open_call()


def test_cpu_gets_float32_and_cuda_would_get_bf16():
    from server.model.check import default_device, default_dtype

    assert default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype(torch.device("cuda")) == torch.bfloat16
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_int16_frames_are_refused_not_played_as_static():
    pcm16 = (tone_frames(440, 1, dbfs=-20)[0] * 32767).astype(np.int16)
    with pytest.raises(TypeError, match="float32 PCM"):
        check_frame(pcm16, FRAME)
    with pytest.raises(ValueError, match="int16 samples stored as float"):
        check_frame(pcm16.astype(np.float32), FRAME)
    with pytest.raises(TypeError, match="float32"):
        check_frame(pcm16.astype(np.float64) / 32768, FRAME)
    with pytest.raises(ValueError, match="1920 mono samples"):
        check_frame(np.zeros(960, np.float32), FRAME)
    with pytest.raises(ValueError, match="NaN"):
        check_frame(np.full(FRAME, np.nan, np.float32), FRAME)
    ok = check_frame(tone_frames(440, 1, dbfs=-20)[0], FRAME)
    assert ok.dtype == np.float32 and np.abs(ok).max() <= 1.0


async def test_frames_report_input_and_output_rms_and_step_time(tiny_engine):
    frames = tone_frames(440, 8, dbfs=-20)
    call = await tiny_engine.open_call()
    results = [await call.process(f) for f in frames]
    stats = call.stats
    await call.close()
    for r in results:
        assert r.input_rms == pytest.approx(0.1, rel=0.01)  # -20 dBFS
        assert r.step_ms > 0 and r.latency_ms >= r.step_ms
        assert r.output_rms == pytest.approx(float(np.sqrt(np.mean(r.audio.astype(np.float64) ** 2))), rel=1e-6)
    assert [r.silent for r in results[:2]] == [True, True] and not any(r.silent for r in results[2:])
    assert results[0].output_rms == 0.0 and results[3].output_rms > 0.01
    assert (stats.frames_in, stats.frames_out, stats.frames_silent, stats.frames_dropped) == (8, 8, 2, 0)
    assert stats.mean_step_ms > 0 and stats.last_input_rms == pytest.approx(0.1, rel=0.01)
    assert len(tiny_engine.stats.step_ms) == tiny_engine.stats.steps >= 8
