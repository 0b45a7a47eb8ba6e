"""Call slots on one shared model: isolation, neighbours, input sensitivity, admission.

Seed 000's lesson: a fixed seed makes "same as last time" pass even for a
broken pipeline, so each property is tested in both directions.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from conftest import audio_of, noise_frames, run_call, texts_of, tone_frames

from server.engine import ClientAtLimit, EngineFull, FrameDropped
from server.engine.setup import create_engine
from server.model.moshi_step import GREEDY
from server.model.source import ModelSource

FRAMES = 14


def same(a, b) -> bool:
    return np.array_equal(audio_of(a), audio_of(b)) and texts_of(a) == texts_of(b)


async def test_same_input_and_seed_give_identical_calls_also_in_a_reused_slot(sampling_engine):
    frames = noise_frames(1, FRAMES)
    first = await run_call(sampling_engine, frames, seed=42)
    second = await run_call(sampling_engine, frames, seed=42)  # slot 0 again, after call 1 used it
    assert same(first, second)
    assert any(not r.silent for r in first) and any(r.text for r in first)


async def test_same_input_and_seed_in_another_slot_beside_a_busy_one(sampling_engine):
    frames = noise_frames(1, FRAMES)
    alone = await run_call(sampling_engine, frames, seed=42)
    blocker = await sampling_engine.open_call(seed=7)  # holds slot 0
    for frame in noise_frames(9, 5):
        await blocker.process(frame)
    beside = await run_call(sampling_engine, frames, seed=42)  # slot 1
    await blocker.close()
    assert same(alone, beside)


async def test_a_call_does_not_hear_the_previous_caller(tiny_engine):
    """Call 2 with input X equals a fresh call with input X, whatever call 1 said in that slot."""
    reference = await run_call(tiny_engine, noise_frames(5, FRAMES))
    await run_call(tiny_engine, tone_frames(220, 30, dbfs=-6))  # a loud, different first caller
    after = await run_call(tiny_engine, noise_frames(5, FRAMES))
    assert same(reference, after)


async def test_different_seeds_differ_and_unseeded_calls_differ(sampling_engine):
    frames = noise_frames(1, FRAMES)
    a = await run_call(sampling_engine, frames, seed=1)
    b = await run_call(sampling_engine, frames, seed=2)
    c = await run_call(sampling_engine, frames, seed=None)
    d = await run_call(sampling_engine, frames, seed=None)
    assert not same(a, b)
    assert not same(c, d)


async def test_input_matters(tiny_engine):
    a = await run_call(tiny_engine, noise_frames(1, FRAMES))
    b = await run_call(tiny_engine, tone_frames(440, FRAMES))
    assert not np.array_equal(audio_of(a), audio_of(b))
    assert texts_of(a) != texts_of(b)


async def test_the_first_frame_is_dropped(tiny_engine):
    """Two calls that differ only in their first frame answer identically; a later difference shows."""
    frames = noise_frames(3, FRAMES)
    other_first = [tone_frames(1000, 1, dbfs=-3)[0]] + frames[1:]
    other_third = frames[:2] + [tone_frames(1000, 1, dbfs=-3)[0]] + frames[3:]
    base = await run_call(tiny_engine, frames)
    assert same(base, await run_call(tiny_engine, other_first))
    assert not same(base, await run_call(tiny_engine, other_third))


async def _run_concurrently(engine, streams: list[tuple[list[np.ndarray], int]]):
    """Each stream is (frames, start_delay_in_frames); frames of different calls arrive out of phase."""

    async def one(frames, delay, seed):
        call = await engine.open_call(seed=seed)
        try:
            for _ in range(delay):
                await asyncio.sleep(0)  # let the other callers' frames go first
            out = []
            for i, frame in enumerate(frames):
                out.append(await call.process(frame))
                if i % 3 == delay % 3:
                    await asyncio.sleep(0.002)  # uneven pacing: steps mix 1, 2 and 3 active slots
            return out
        finally:
            await call.close()

    return await asyncio.gather(*(one(f, d, seed) for seed, (f, d) in enumerate(streams, start=100)))


@pytest.fixture(params=["greedy", "sampling"])
async def either_engine(request):
    engine = create_engine(ModelSource("tiny"), max_calls=3, sampling=GREEDY if request.param == "greedy" else None)
    await engine.start()
    yield engine
    await engine.stop()


async def test_neighbours_do_not_change_a_call(either_engine):
    engine = either_engine
    mine = noise_frames(1, FRAMES)
    alone = await run_call(engine, mine, seed=100)
    together = await _run_concurrently(engine, [(mine, 0), (tone_frames(300, 20), 2), (noise_frames(8, 9), 5)])
    assert same(alone, together[0])
    assert engine.stats.steps < engine.stats.slot_steps  # some steps really were batched


async def test_a_full_engine_refuses_and_a_freed_slot_is_usable_at_once(tiny_engine):
    calls = [await tiny_engine.open_call() for _ in range(3)]
    assert tiny_engine.free_slots == 0
    with pytest.raises(EngineFull, match="all 3 call slots are busy"):
        await tiny_engine.open_call()
    await calls[1].close()
    assert tiny_engine.free_slots == 1
    replacement = await tiny_engine.open_call()
    assert replacement.slot == calls[1].slot
    result = await replacement.process(noise_frames(0, 1)[0])
    assert result.audio.shape == (tiny_engine.frame_size,)
    for call in (calls[0], calls[2], replacement):
        await call.close()
    assert tiny_engine.free_slots == 3


async def test_closing_a_call_cancels_its_queued_frames(tiny_engine):
    call = await tiny_engine.open_call()
    pending = [asyncio.ensure_future(call.process(f)) for f in noise_frames(2, tiny_engine.max_backlog_frames)]
    await asyncio.sleep(0)
    await call.close()
    outcomes = await asyncio.gather(*pending, return_exceptions=True)
    assert all(isinstance(o, asyncio.CancelledError) or not isinstance(o, Exception) for o in outcomes)
    assert tiny_engine.free_slots == 3
    with pytest.raises(RuntimeError, match="closed"):
        await call.process(noise_frames(0, 1)[0])


async def test_opening_a_call_resets_only_its_own_slot(tiny_engine):
    mine = noise_frames(1, FRAMES)
    alone = await run_call(tiny_engine, mine)
    call = await tiny_engine.open_call(seed=1234)
    results = [await call.process(frame) for frame in mine[:6]]
    newcomer = await tiny_engine.open_call()  # resets slot 1 while slot 0 is mid-call
    await newcomer.process(tone_frames(500, 1)[0])
    results += [await call.process(frame) for frame in mine[6:]]
    await newcomer.close()
    await call.close()
    assert same(alone, results)


async def test_a_backlog_past_its_bound_drops_the_oldest_frames_and_counts_them(tiny_engine, monkeypatch):
    call = await tiny_engine.open_call()
    frames = noise_frames(2, 7)
    stepper, stepping, gate = tiny_engine.stepper, threading.Event(), threading.Event()
    step = stepper.step

    def held_step(*args, **kwargs):  # the model is slower than the caller, however idle the machine
        stepping.set()
        gate.wait()
        return step(*args, **kwargs)

    monkeypatch.setattr(stepper, "step", held_step)
    futures = [call.submit(frames[0])]
    await asyncio.get_running_loop().run_in_executor(None, stepping.wait)  # the first frame is in the step
    futures += [call.submit(frame) for frame in frames[1:]]  # all at once, while that step is held
    gate.set()
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    bound = tiny_engine.max_backlog_frames
    dropped = [o for o in outcomes if isinstance(o, FrameDropped)]
    # The step holds the first frame; of the rest only the newest `bound` may wait, the older ones go.
    assert not isinstance(outcomes[0], Exception)
    assert all(isinstance(o, FrameDropped) for o in outcomes[1:-bound]) and len(dropped) == len(frames) - bound - 1
    assert not any(isinstance(o, Exception) for o in outcomes[-bound:])  # the newest frames are kept
    assert call.stats.frames_dropped == len(dropped) == tiny_engine.stats.frames_dropped
    await call.close()


async def test_one_client_gets_at_most_its_share_even_when_its_offers_race():
    """The share is counted where slots are taken: two offers of one client at once get one slot, not two;
    a full engine says busy before it says "your share"; a closed call gives the share back."""
    engine = create_engine(ModelSource("echo"), max_calls=3)
    await engine.start()
    try:
        outcomes = await asyncio.gather(*(engine.open_call(client="a", client_limit=1) for _ in range(2)),
                                        return_exceptions=True)
        (held,) = [o for o in outcomes if not isinstance(o, Exception)]
        (refused,) = [o for o in outcomes if isinstance(o, Exception)]
        assert isinstance(refused, ClientAtLimit) and "at most 1 of the 3 lines" in str(refused)
        other = await engine.open_call(client="b", client_limit=1)
        anyone = await engine.open_call()  # no client: no share (the engine's own callers, tests)
        with pytest.raises(EngineFull):
            await engine.open_call(client="a", client_limit=1)
        await anyone.close()
        await held.close()
        again = await engine.open_call(client="a", client_limit=1)
        assert again.client == "a" and other.client == "b"
    finally:
        await engine.stop()
