"""Right channels, and no bad token ever reaching an embedding or the decoder.

Seed 001 (C): the text channel fed to the audio decoder made noise. Seed 001
(A): out-of-range ids crashed the GPU, and the "fix" clamped them into range,
hiding the bug. Here channel 0 is text and only 1..dep_q reach `decode`;
markers (-1, -2) are skipped; any other out-of-range id is a named error.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from conftest import noise_frames, run_call, spy
from moshi.models.compression import MimiModel
from moshi.models.lm import LMGen

from server.engine.setup import create_engine
from server.model.moshi_step import GREEDY
from server.model.source import ModelSource
from server.model.tiny_model import build_tiny_model
from server.model.tokens import TextPieces, TokenRangeError, route_step


@pytest.fixture
def traffic(monkeypatch):
    """Record what LMGen.step takes and returns, and what MimiModel.decode receives."""
    seen: dict[str, list] = {"lm_in": [], "lm_out": [], "decode": []}

    def lm_step(gen, args, out):
        seen["lm_in"].append(args[0].clone())
        seen["lm_out"].append(out.clone())

    spy(monkeypatch, LMGen, "step", lm_step)
    spy(monkeypatch, MimiModel, "decode", lambda mimi, args, pcm: seen["decode"].append(args[0].clone()))
    return seen


async def test_only_audio_channels_reach_the_decoder_and_text_comes_from_channel_0(traffic):
    engine = create_engine(ModelSource("tiny"), max_calls=1, sampling=GREEDY)
    await engine.start()
    for seen in traffic.values():
        seen.clear()
    results = await run_call(engine, noise_frames(4, 16))
    dep_q = engine.stepper.layout.dep_q
    text_pieces = engine.stepper.text
    await engine.stop()

    generated = [out for out in traffic["lm_out"] if (out >= 0).all()]
    assert len(traffic["decode"]) == len(generated) > 0
    for out, decoded in zip(generated, traffic["decode"], strict=True):
        assert decoded.shape[1] == dep_q
        assert torch.equal(decoded, out[:, 1 : 1 + dep_q])
    expected_text = [text_pieces.piece(int(out[0, 0, 0])) for out in generated]
    assert [r.text for r in results if not r.silent] == expected_text
    assert any(t is not None for t in expected_text)


def test_text_padding_ids_give_no_text_and_others_give_pieces():
    tokenizer = build_tiny_model().text_tokenizer()
    pieces = TextPieces(tokenizer, padding_ids=(0, 3))
    assert pieces.piece(0) is None and pieces.piece(3) is None and pieces.piece(None) is None
    assert pieces.piece(1) is None and pieces.piece(2) is None  # <s> and </s> are not text
    word = tokenizer.piece_to_id("\u2581the")
    assert word not in (0, 3)
    assert pieces.piece(word) == " the"


def _route(tokens, rows=None):
    tokens = np.array(tokens)
    rows = np.ones(len(tokens), bool) if rows is None else np.array(rows)
    return route_step(tokens, rows, text_card=100, card=50, dep_q=3)


def test_routing_skips_markers_and_masked_rows():
    routed = _route(
        [
            [-2, -2, -2, -2],  # not generated yet
            [7, -1, 4, 4],  # a zero token in the audio: no decode, text still read
            [3, 1, 2, 3],  # padding text, audio decodes
            [9, 999, 999, 999],  # masked out of the step: never looked at
        ],
        rows=[True, True, True, False],
    )
    assert (routed[0].text_id, routed[0].decode_audio, routed[0].error) == (None, False, None)
    assert (routed[1].text_id, routed[1].decode_audio, routed[1].error) == (7, False, None)
    assert (routed[2].text_id, routed[2].decode_audio, routed[2].error) == (3, True, None)
    assert (routed[3].decode_audio, routed[3].error) == (False, None)


@pytest.mark.parametrize(
    ("row", "channel", "where"),
    [([1, 2, 50, 3], 2, "LM audio output"), ([100, 2, 3, 4], 0, "LM text output"), ([1, 2, 3, -7], 3, "audio")],
)
def test_routing_names_slot_and_channel_of_an_out_of_range_id(row, channel, where):
    routed = _route([[1, 1, 1, 1], row])
    assert routed[0].error is None
    error = routed[1].error
    assert isinstance(error, TokenRangeError)
    assert (error.slot, error.channel) == (1, channel)
    assert f"slot 1 channel {channel}" in str(error) and where in str(error)
    assert not routed[1].decode_audio


async def _two_calls_with_fault(engine):
    """Call A (slot 0) and call B (slot 1) in lockstep; returns per-call results or the exception."""
    call_a = await engine.open_call(seed=1)
    call_b = await engine.open_call(seed=2)
    frames_a, frames_b = noise_frames(10, 10), noise_frames(11, 10)
    results_a, results_b, error = [], [], None
    for i in range(10):
        got = await asyncio.gather(call_a.process(frames_a[i]), call_b.process(frames_b[i]), return_exceptions=True)
        if isinstance(got[0], Exception):
            error = got[0]
            results_b.append(got[1])
            break
        results_a.append(got[0])
        results_b.append(got[1])
    return call_a, call_b, results_a, results_b, error


async def test_an_out_of_range_lm_token_fails_its_call_only_and_is_counted(traffic, monkeypatch):
    engine = create_engine(ModelSource("tiny"), max_calls=2, sampling=GREEDY)
    await engine.start()
    stepper = engine.stepper
    card = stepper.layout.card
    original = stepper._generate
    steps = {"n": 0}

    def corrupt(user_codes, rows, prompt_rows, outputs):
        tokens = original(user_codes, rows, prompt_rows, outputs)
        steps["n"] += int(rows[0])
        if steps["n"] == 5 and rows[0]:
            tokens[0, 2] = card + 5  # slot 0, audio codebook channel 2
        return tokens

    monkeypatch.setattr(stepper, "_generate", corrupt)
    for seen in traffic.values():
        seen.clear()
    call_a, call_b, results_a, results_b, error = await _two_calls_with_fault(engine)

    assert isinstance(error, TokenRangeError)
    assert "slot 0 channel 2" in str(error) and str(card + 5) in str(error)
    assert call_a.stats.token_errors == 1 and engine.stats.token_errors == 1
    with pytest.raises(TokenRangeError):
        await call_a.process(noise_frames(0, 1)[0])
    # Never clamped into range: the bad id never reached the decoder.
    assert all(int(codes.max()) < card and int(codes.min()) >= 0 for codes in traffic["decode"])
    # The neighbour in slot 1 got its frame in that very step, and goes on.
    assert not isinstance(results_b[-1], Exception) and not results_b[-1].silent
    assert not (await call_b.process(noise_frames(5, 1)[0])).silent
    await call_a.close()
    await call_b.close()
    assert engine.free_slots == 2
    await engine.stop()


async def test_an_out_of_range_code_from_the_encoder_never_reaches_the_lm(traffic, monkeypatch):
    engine = create_engine(ModelSource("tiny"), max_calls=2, sampling=GREEDY)
    await engine.start()
    stepper = engine.stepper
    card = stepper.layout.card
    original = stepper._encode
    steps = {"n": 0}

    def corrupt(frames, rows):
        codes = original(frames, rows)
        steps["n"] += int(rows[1])
        if steps["n"] == 4 and rows[1]:
            codes[1, 3, 0] = card  # slot 1, codebook 3: one past the end
        return codes

    monkeypatch.setattr(stepper, "_encode", corrupt)
    for seen in traffic.values():
        seen.clear()
    call_a = await engine.open_call(seed=1)
    call_b = await engine.open_call(seed=2)
    caught = None
    for frame_a, frame_b in zip(noise_frames(1, 6), noise_frames(2, 6), strict=True):
        result_a, result_b = await asyncio.gather(call_a.process(frame_a), call_b.process(frame_b),
                                                  return_exceptions=True)
        assert not isinstance(result_a, Exception)
        if isinstance(result_b, Exception):
            caught = result_b
            break
    assert isinstance(caught, TokenRangeError)
    assert "Mimi encoder output: slot 1 channel 3" in str(caught)
    assert all(int(codes.max()) < card and int(codes.min()) >= 0 for codes in traffic["lm_in"])
    await call_a.close()
    await call_b.close()
    await engine.stop()


async def test_ungenerated_rows_are_skipped_not_clamped(traffic, monkeypatch):
    engine = create_engine(ModelSource("tiny"), max_calls=1, sampling=GREEDY)
    await engine.start()
    stepper = engine.stepper
    original = stepper._generate
    steps = {"n": 0}

    def unmark(user_codes, rows, prompt_rows, outputs):
        tokens = original(user_codes, rows, prompt_rows, outputs)
        steps["n"] += 1
        if steps["n"] == 6:
            tokens[0, 1:] = -2  # as if this row's audio were not generated
        return tokens

    monkeypatch.setattr(stepper, "_generate", unmark)
    for seen in traffic.values():
        seen.clear()
    results = await run_call(engine, noise_frames(8, 10))
    await engine.stop()
    # Frames 0 (dropped first frame) and 1 (LM delay) are silent by design; frame 6 is the marked one.
    assert [r.silent for r in results] == [True, True, False, False, False, False, True, False, False, False]
    assert all(int(codes.min()) >= 0 for codes in traffic["decode"])
