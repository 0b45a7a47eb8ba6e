"""ONE Mimi encodes and decodes, and its streaming state runs across frames.

Seed 000: a decoder cloned from the encoder kept its own state and the audio
was garbled. These tests pin that the engine's decoder is its encoder, and
that frame-by-frame decoding equals decoding in one piece, a comparison that
a decoder reset between frames fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import noise_frames, run_call, spy
from moshi.models.compression import MimiModel

from server.engine.setup import create_engine
from server.model.moshi_step import GREEDY
from server.model.source import ModelSource
from server.model.tiny_model import build_tiny_model


@pytest.fixture
def mimi_spy(monkeypatch):
    """Record which MimiModel object encodes and decodes, and the codes it decodes."""
    seen: dict[str, list] = {"encode": [], "decode": []}
    spy(monkeypatch, MimiModel, "encode", lambda mimi, args, codes: seen["encode"].append(id(mimi)))
    spy(monkeypatch, MimiModel, "decode",
        lambda mimi, args, pcm: seen["decode"].append((id(mimi), args[0].clone())))
    return seen


async def test_the_object_that_decodes_is_the_object_that_encodes(mimi_spy):
    engine = create_engine(ModelSource("tiny"), max_calls=2, sampling=GREEDY)
    await engine.start()
    mimi_spy["encode"].clear()  # forget the tiny model's calibration and the warm-up
    mimi_spy["decode"].clear()
    results = await run_call(engine, noise_frames(1, 8))
    mimi = engine.stepper.mimi
    await engine.stop()
    assert any(not r.silent for r in results)
    assert set(mimi_spy["encode"]) == {id(mimi)}
    assert {owner for owner, _ in mimi_spy["decode"]} == {id(mimi)}


def _decode_streaming(mimi: MimiModel, codes: torch.Tensor, reset_between_frames: bool) -> np.ndarray:
    pieces = []
    with torch.no_grad(), mimi.streaming(1):
        for t in range(codes.shape[-1]):
            if reset_between_frames:
                mimi.reset_streaming()
            pieces.append(mimi.decode(codes[:, :, t : t + 1]))
    return torch.cat(pieces, dim=-1)[0, 0].numpy()


def test_streaming_decode_matches_one_piece_and_a_reset_decoder_does_not():
    mimi = build_tiny_model().mimi
    codes = torch.randint(0, mimi.cardinality, (1, mimi.num_codebooks, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = mimi.decode(codes)[0, 0].numpy()
    streamed = _decode_streaming(mimi, codes, reset_between_frames=False)
    broken = _decode_streaming(mimi, codes, reset_between_frames=True)
    level = float(np.std(whole))
    assert np.abs(streamed - whole).max() < 1e-3 * level
    assert np.abs(broken - whole).max() > 0.1 * level


async def test_engine_audio_is_the_one_piece_decode_of_its_codes(mimi_spy):
    """The engine's output frames, glued together, equal decoding all its codes at once."""
    engine = create_engine(ModelSource("tiny"), max_calls=1, sampling=GREEDY)
    await engine.start()
    mimi_spy["decode"].clear()  # forget warm-up
    results = await run_call(engine, noise_frames(2, 14))
    await engine.stop()
    voiced = [r.audio for r in results if not r.silent]
    codes = torch.cat([c for _, c in mimi_spy["decode"]], dim=-1)
    assert codes.shape[-1] == len(voiced) >= 10
    with torch.no_grad():
        whole = build_tiny_model().mimi.decode(codes)[0, 0].numpy()
    engine_audio = np.concatenate(voiced)
    level = float(np.std(whole))
    assert np.abs(engine_audio - whole).max() < 1e-3 * level


def test_a_stepper_that_cannot_start_streaming_hands_the_model_back(monkeypatch):
    """Out of device memory for one more slot's KV cache must not leave the shared Mimi streaming at the
    failed batch size: the next stepper on the same model (a smaller batch) works."""
    from moshi.models.lm import LMGen

    from server.model.moshi_step import MoshiStepper
    from server.model.source import load_model

    model = load_model(ModelSource("tiny"), torch.device("cpu"), torch.float32)

    def out_of_memory(self, batch_size):
        raise torch.OutOfMemoryError("CUDA out of memory (injected: a CPU cannot run out of device memory)")

    with monkeypatch.context() as patch:
        patch.setattr(LMGen, "streaming", out_of_memory)
        with pytest.raises(torch.OutOfMemoryError):
            MoshiStepper(model, 48, GREEDY)
    assert not model.mimi.is_streaming
    stepper = MoshiStepper(model, 2, GREEDY)
    stepper.warm_up()
    outputs = stepper.step(np.stack(noise_frames(3, 2)), np.array([True, True]))
    assert [o.error for o in outputs] == [None, None]
    stepper.close()
