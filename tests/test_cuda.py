"""The batched path on a CUDA GPU, at the real size: bf16 weights, CUDA graphs on.

Runs only where CUDA is present; on a GPU host with the packages installed:

    python3 -m pytest tests/test_cuda.py                       # every property, both layouts
    CUDA_LAUNCH_BLOCKING=1 python3 -m pytest tests/test_cuda.py -k masked   # masked rows, launches synchronous

The models are moshiko's and PersonaPlex's architectures with random weights
(`server.model.random_model`): the same shapes, kernels and graphs as the real
checkpoints. Each property is the one the CPU suite checks on the tiny model,
here where it can break differently: graph replays reuse their output
buffers, bf16 kernels are picked per shape, and an out-of-range id is a
device-side assert that kills the process instead of an exception.

"Alone" always means the same stepper (same batch size, so the same kernels)
with the other rows masked out: that is what a call sees when its neighbours
hang up, and what the engine guarantees. `MOSHI_WEBRTC_GPU_TESTS_ON_CPU=1` runs
the same tests on the tiny models on a CPU, to check the tests themselves.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch
from conftest import noise_frames, tone_frames

from server.model.kv_compat import KvOptions
from server.model.moshi_step import GREEDY, MoshiStepper, SamplingConfig
from server.model.persona import Persona, PromptPlan
from server.model.persona_step import PersonaStepper, VoiceOptions, synthetic_voices
from server.model.source import LoadedModel, ModelSource, load_model
from server.model.stepper import SlotOutput
from server.model.tokens import TokenRangeError

ON_CPU = os.environ.get("MOSHI_WEBRTC_GPU_TESTS_ON_CPU") == "1"
pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or ON_CPU),
    reason="needs a CUDA GPU (real-size models, bf16, CUDA graphs); see the module docstring for the command",
)

BATCH = 4
MODELS = {"moshiko": "random-moshiko", "personaplex": "random-personaplex"}
TINY = {"moshiko": "tiny", "personaplex": "tiny-persona"}
# Today's cache (moshi's own), the window (moshi's attention, fewer entries) in bf16 and int8, our fused kernel.
KV = {"ring": KvOptions(), "window": KvOptions("window"), "window-int8": KvOptions("window", "int8"),
      "fused-int8": KvOptions("fused", "int8")}


@pytest.fixture(scope="class", params=["moshiko", "personaplex"])
def model(request) -> LoadedModel:
    """One real-size model at a time (about 16 GB of bf16 weights each), with CUDA graphs enabled."""
    with pytest.MonkeyPatch.context() as env:
        env.delenv("NO_CUDA_GRAPH", raising=False)  # conftest turns graphs off for the CPU suite
        if ON_CPU:
            loaded = load_model(ModelSource(TINY[request.param]), torch.device("cpu"), torch.float32)
        else:
            loaded = load_model(ModelSource(MODELS[request.param]), torch.device("cuda"), torch.bfloat16)
        yield loaded
    del loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture
def graph_replays(monkeypatch) -> list[int]:
    """Counts CUDA graph replays, to show the steps really run as graphs."""
    count = [0]
    original = torch.cuda.CUDAGraph.replay

    def replay(graph):
        count[0] += 1
        return original(graph)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", replay)
    return count


def make_stepper(
    model: LoadedModel, sampling: SamplingConfig, stepper_class: type | None = None, kv: KvOptions = KV["ring"]
) -> MoshiStepper:
    persona = model.lm.n_q == model.lm.dep_q
    cls = stepper_class or (PersonaStepper if persona else MoshiStepper)
    if persona:
        stepper = cls(model, BATCH, sampling, voices=VoiceOptions(synthetic=synthetic_voices()), kv=kv)
    else:
        stepper = cls(model, BATCH, sampling, kv=kv)
    stepper.warm_up()
    return stepper


@pytest.fixture(params=list(KV))
def kv(request) -> KvOptions:
    return KV[request.param]


@pytest.fixture
def stepper_for(model, kv):
    made: list[MoshiStepper] = []

    def build(sampling: SamplingConfig = GREEDY, stepper_class: type | None = None) -> MoshiStepper:
        made.append(make_stepper(model, sampling, stepper_class, kv))
        return made[-1]

    yield build
    for stepper in made:
        stepper.close()


# -- driving calls through a stepper ------------------------------------------------------------------


@dataclass
class Call:
    """One call: it takes `slot` at step `start`, then sends its frames, none at the steps `idle(step)`."""

    slot: int
    frames: list[np.ndarray]
    start: int = 0
    seed: int = 0
    idle: Callable[[int], bool] = lambda step: False
    plan: PromptPlan | None = None
    outputs: list[SlotOutput] = field(default_factory=list)


def run(stepper: MoshiStepper, calls: list[Call]) -> list[list[SlotOutput]]:
    """Step until every call has sent all its frames; each call's outputs, copied as they come out."""
    calls = [replace(call, outputs=[]) for call in calls]
    sent = [0] * len(calls)
    step = 0
    while any(sent[i] < len(c.frames) for i, c in enumerate(calls)):
        for call in calls:
            if call.start == step:
                stepper.reset_slots([call.slot], [call.seed])
                if call.plan is not None:
                    stepper.start_prompt(call.slot, call.plan)
        frames = np.zeros((stepper.batch_size, stepper.frame_size), dtype=np.float32)
        rows = np.zeros(stepper.batch_size, dtype=bool)
        prompting = stepper.prompting_rows()
        senders = []
        for i, call in enumerate(calls):
            live = call.start <= step and sent[i] < len(call.frames) and not prompting[call.slot]
            if live and not call.idle(step):
                frames[call.slot] = call.frames[sent[i]]
                rows[call.slot] = True
                senders.append(i)
        if rows.any() or prompting.any():
            outputs = stepper.step(frames, rows)
            for i in senders:
                out = outputs[calls[i].slot]
                audio = None if out.audio is None else out.audio.copy()
                calls[i].outputs.append(SlotOutput(audio, out.text, out.error))
                sent[i] += 1
        step += 1
        assert step < 1000, "the schedule never finished"
    return [call.outputs for call in calls]


def alone(stepper: MoshiStepper, call: Call) -> list[SlotOutput]:
    """The call by itself in its slot, every other row masked out, frames back to back."""
    return run(stepper, [replace(call, start=0, idle=lambda step: False)])[0]


def same(a: list[SlotOutput], b: list[SlotOutput]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if (x.audio is None) != (y.audio is None) or x.text != y.text or (x.error is None) != (y.error is None):
            return False
        if x.audio is not None and not np.array_equal(x.audio, y.audio):
            return False
    return True


def assert_clean(outputs: list[SlotOutput]) -> None:
    """Valid codes never trip a token check, and the call answers with audio once the LM's delay is over."""
    assert [o.error for o in outputs if o.error is not None] == []
    assert sum(o.audio is not None for o in outputs) >= len(outputs) - 3
    for o in outputs:
        if o.audio is not None:
            assert np.isfinite(o.audio).all()


def persona_plan(stepper: MoshiStepper, prompt: str = "You enjoy having a good conversation.") -> PromptPlan | None:
    if stepper.prompt_book is None:
        return None
    return stepper.prompt_book.plan(Persona(prompt=prompt, voice="test-low"))


# -- the tests ----------------------------------------------------------------------------------------


class TestOnCuda:
    def test_batched_steps_equal_the_calls_alone_with_phases_masked_rows_and_a_mid_call_reset(
        self, stepper_for, graph_replays
    ):
        stepper = stepper_for(GREEDY)
        calls = [
            Call(0, noise_frames(1, 24), start=0),
            Call(1, tone_frames(300, 20), start=3),
            Call(2, noise_frames(3, 16), start=5, idle=lambda step: step % 3 == 0),  # a row masked every third step
            Call(3, noise_frames(4, 8), start=0),
            Call(3, noise_frames(5, 14), start=11),  # the slot is reset while the other three are mid-call
        ]
        replays_before = graph_replays[0]
        together = run(stepper, calls)
        if not ON_CPU:
            assert graph_replays[0] > replays_before  # the steps ran as CUDA graph replays
        for call, outputs in zip(calls, together, strict=True):
            assert_clean(outputs)
            assert same(outputs, alone(stepper, call)), f"slot {call.slot} (start {call.start}) differs from alone"
        # Input matters: a different caller in slot 0 gets a different answer.
        other = alone(stepper, Call(0, noise_frames(9, 24)))
        assert not same(other, together[0])

    def test_a_prompt_replaying_beside_live_calls_changes_nothing_for_them(self, stepper_for):
        stepper = stepper_for(GREEDY)
        plan = persona_plan(stepper)
        if plan is None:
            pytest.skip("moshiko takes no persona prompt")
        assert plan.steps > 20
        calls = [
            Call(0, noise_frames(1, 10), start=2, plan=plan),  # replays its prompt beside the others
            Call(1, noise_frames(2, 30), start=0),
            Call(2, tone_frames(440, 30), start=1, idle=lambda step: step % 4 == 1),
        ]
        together = run(stepper, calls)
        for call, outputs in zip(calls, together, strict=True):
            assert_clean(outputs)
            assert same(outputs, alone(stepper, call)), f"slot {call.slot} differs from alone"
        # The prompt changes what the prompted call hears back.
        assert not same(together[0], alone(stepper, replace(calls[0], plan=None)))

    def test_graph_outputs_are_not_overwritten_by_the_next_replay(self, stepper_for):
        stepper = stepper_for(GREEDY)
        stepper.reset_slots([0, 1], [0, 1])
        frames = np.stack([noise_frames(6, 1)[0], noise_frames(7, 1)[0], *np.zeros((BATCH - 2, 1920), np.float32)])
        rows = np.array([True, True] + [False] * (BATCH - 2))
        kept, copies = [], []
        for _ in range(8):
            outputs = stepper.step(frames, rows)
            kept.append(outputs)
            copies.append([None if o.audio is None else o.audio.copy() for o in outputs])
        for outputs, snapshot in zip(kept, copies, strict=True):
            for out, copy in zip(outputs, snapshot, strict=True):
                assert (out.audio is None) == (copy is None)
                if copy is not None:
                    assert np.array_equal(out.audio, copy)
        assert sum(o.audio is not None for o in kept[-1]) == 2

    def test_sampling_is_per_slot_under_graph_replay(self, stepper_for):
        stepper = stepper_for(SamplingConfig())
        mine = noise_frames(1, 16)
        first = alone(stepper, Call(0, mine, seed=42))
        # Same seed and input in another slot, beside two busy neighbours, with gaps in its frames: identical.
        beside = run(stepper, [Call(2, mine, seed=42, idle=lambda step: step % 3 == 1),
                               Call(0, noise_frames(2, 16), seed=7),
                               Call(1, tone_frames(200, 16), seed=8, start=2)])
        assert_clean(first)
        assert same(first, beside[0])
        # A different seed: a different answer.
        assert not same(first, alone(stepper, Call(0, mine, seed=43)))
        # A neighbour's seed never changes another slot's tokens.
        neighbour_a = run(stepper, [Call(1, noise_frames(3, 16), seed=5), Call(0, mine, seed=42)])[0]
        neighbour_b = run(stepper, [Call(1, noise_frames(3, 16), seed=5), Call(0, mine, seed=43)])[0]
        assert same(neighbour_a, neighbour_b)

    def test_the_window_equals_the_whole_ring_across_window_lengths(self, model, kv):
        """Long enough to change window length (the ring wraps on the tiny model): the same outputs as
        moshi's whole-ring cache, under the same kv storage."""
        if not kv.window:
            pytest.skip("the whole ring is the reference")
        ring = 3000 if not ON_CPU else 100
        frames = 200 if not ON_CPU else 120  # past the first window length (188 of 3000), past the tiny ring
        assert model.lm.transformer.layers[0].self_attn.context == ring
        calls = [Call(0, noise_frames(21, frames)), Call(2, tone_frames(250, frames - 9), start=9,
                                                         idle=lambda step: step % 3 == 0)]
        outputs = {}
        for name, options in (("whole", replace(kv, attention="ring")), ("window", kv)):
            stepper = make_stepper(model, GREEDY, kv=options)
            try:
                outputs[name] = run(stepper, calls)
                if options.window:
                    assert len(stepper.kv_window.used) >= 2
            finally:
                stepper.close()
        for whole, window in zip(outputs["whole"], outputs["window"], strict=True):
            assert_clean(window)
            assert same(whole, window)

    @pytest.mark.parametrize("sampling", [GREEDY, SamplingConfig()], ids=["greedy", "sampling"])
    def test_masked_rows_never_reach_an_embedding(self, stepper_for, sampling):
        """Rows idle, starting, resetting and masked in every combination; under CUDA_LAUNCH_BLOCKING=1 a
        bad id would be a device-side assert at its launch, here it would fail the synchronize."""
        stepper = stepper_for(sampling)
        plan = persona_plan(stepper)
        calls = [
            Call(0, noise_frames(11, 12), start=1, idle=lambda step: step % 2 == 0),
            Call(1, noise_frames(12, 3), start=4),  # ends while others go on
            Call(1, noise_frames(13, 6), start=9, plan=plan),
            Call(3, noise_frames(14, 5), start=6, idle=lambda step: step in (7, 8, 9)),
        ]
        for outputs in run(stepper, calls):
            assert [o.error for o in outputs if o.error is not None] == []
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def test_an_out_of_range_code_from_the_encoder_is_refused_for_its_call_alone(self, model, stepper_for):
        card = model.lm.card

        class Faulty(PersonaStepper if model.lm.n_q == model.lm.dep_q else MoshiStepper):
            encodes = 0

            def _encode(self, frames, rows):
                codes = super()._encode(frames, rows).clone()
                Faulty.encodes += 1
                if Faulty.encodes == 5:
                    codes[1, 2, 0] = card  # slot 1, codebook 2: one past the end
                return codes

        stepper = stepper_for(GREEDY, Faulty)
        Faulty.encodes = 0
        outputs = run(stepper, [Call(0, noise_frames(1, 12)), Call(1, noise_frames(2, 12))])
        reference = alone(stepper, Call(0, noise_frames(1, 12)))
        errors = [o.error for o in outputs[1] if o.error is not None]
        assert len(errors) == 1 and isinstance(errors[0], TokenRangeError)
        assert "Mimi encoder output: slot 1 channel 2" in str(errors[0])
        assert outputs[1][4].error is errors[0]
        assert same(outputs[0], reference)  # the neighbour never noticed
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def test_an_out_of_range_lm_token_is_refused_for_its_call_alone(self, model, stepper_for):
        card = model.lm.card

        class Faulty(PersonaStepper if model.lm.n_q == model.lm.dep_q else MoshiStepper):
            generates = 0

            def _generate(self, user_codes, rows, prompt_rows, outputs):
                tokens = super()._generate(user_codes, rows, prompt_rows, outputs).clone()
                Faulty.generates += 1
                if Faulty.generates == 6:
                    tokens[0, 2] = card + 5  # slot 0, the model's audio codebook 2
                return tokens

        stepper = stepper_for(GREEDY, Faulty)
        Faulty.generates = 0
        outputs = run(stepper, [Call(0, noise_frames(1, 12)), Call(1, noise_frames(2, 12))])
        reference = alone(stepper, Call(1, noise_frames(2, 12)))
        errors = [o.error for o in outputs[0] if o.error is not None]
        assert len(errors) == 1 and isinstance(errors[0], TokenRangeError)
        assert "slot 0 channel 2" in str(errors[0]) and str(card + 5) in str(errors[0])
        assert same(outputs[1], reference)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
