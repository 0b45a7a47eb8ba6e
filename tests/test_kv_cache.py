"""The LM's KV cache options (server/model/kv_compat.py) on the tiny models, past the ring's wrap.

The window must change nothing but the cost: every output equal to moshi's whole-ring attention, through
masked rows, a mid-call reset and a ring that wraps (the tiny LM's ring is 100 frames). The 8-bit
storages must halve the memory and, for int8, stay close to the model's own dtype. tests/test_cuda.py runs
the batched properties (alone, masks, prompts, sampling, refusals) with each option, on CUDA or, with
MOSHI_WEBRTC_GPU_TESTS_ON_CPU=1, here.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from server.model import decode_attention, kv_compat
from server.model.kv_compat import KvOptions, KvWindow, kv_bytes_per_slot, window_buckets, windowed_caches
from server.model.moshi_step import GREEDY, MoshiStepper
from server.model.persona_step import PersonaStepper, VoiceOptions, synthetic_voices
from server.model.source import LoadedModel, ModelSource, load_model
from server.model.stepper import SlotOutput

BATCH = 3
STEPS = 240  # past the tiny ring's 100 frames twice over


@pytest.fixture(scope="module", params=["tiny", "tiny-persona"])
def model(request) -> LoadedModel:
    return load_model(ModelSource(request.param), torch.device("cpu"), torch.float32)


def make(model: LoadedModel, kv: KvOptions) -> MoshiStepper:
    if model.lm.n_q == model.lm.dep_q:
        return PersonaStepper(model, BATCH, GREEDY, voices=VoiceOptions(synthetic=synthetic_voices()), kv=kv)
    return MoshiStepper(model, BATCH, GREEDY, kv=kv)


def drive(stepper: MoshiStepper, steps: int = STEPS) -> list[list[SlotOutput]]:
    """Three calls: one every step, one idle every third step, one from step 40 and reset at step 150."""
    stepper.reset_slots([0, 1, 2], [0, 1, 2])
    rng = np.random.default_rng(5)
    kept = []
    for step in range(steps):
        if step == 150:
            stepper.reset_slots([2], [2])
        rows = np.array([True, step % 3 != 0, step >= 40])
        frames = (0.1 * rng.standard_normal((BATCH, stepper.frame_size))).astype(np.float32)
        kept.append([SlotOutput(None if o.audio is None else o.audio.copy(), o.text, o.error)
                     for o in stepper.step(frames, rows)])
    return kept


def drive_with_logits(model: LoadedModel, kv: KvOptions, steps: int) -> tuple[list[list[SlotOutput]],
                                                                              list[torch.Tensor]]:
    """`drive` on a new stepper with `kv` (closed after), and slot 0's text logits at each step."""
    stepper = make(model, kv)
    logits: list[torch.Tensor] = []
    stepper.generator.on_text_logits_hook = lambda values: logits.append(values[0].flatten().clone())
    try:
        return drive(stepper, steps), logits
    finally:
        stepper.close()


def identical(a: list[list[SlotOutput]], b: list[list[SlotOutput]]) -> bool:
    for row_a, row_b in zip(a, b, strict=True):
        for x, y in zip(row_a, row_b, strict=True):
            if x.text != y.text or (x.audio is None) != (y.audio is None) or (x.error is None) != (y.error is None):
                return False
            if x.audio is not None and not np.array_equal(x.audio, y.audio):
                return False
    return True


def test_buckets_are_fractions_of_the_ring_and_a_step_takes_the_least_that_covers_its_rows():
    assert window_buckets(3000) == [188, 375, 750, 1500, 3000]
    assert window_buckets(100) == [7, 13, 25, 50, 100]
    window = KvWindow(batch_size=3, capacity=100, enabled=True)
    none = np.zeros(3, dtype=bool)
    assert window.begin(none) == 7
    window.filled[:] = [6, 40, 100]
    assert window.begin(np.array([True, False, False])) == 7  # 6 filled + the entry this step writes
    assert window.begin(np.array([True, True, False])) == 50  # a masked row's history is not read
    assert window.begin(np.array([False, False, True])) == 100  # a wrapped ring is read whole
    window.end(np.array([True, True, True]))
    assert window.filled.tolist() == [7, 41, 100]  # never past the ring
    window.reset(np.array([False, True, False]))
    assert window.filled.tolist() == [7, 0, 100]
    with window.at_least(25):
        assert window.begin(np.array([True, False, False])) == 25
    assert window.begin(np.array([True, False, False])) == 13
    assert KvWindow(3, 100, enabled=False).begin(np.ones(3, dtype=bool)) == 100
    with pytest.raises(ValueError, match="storage"):
        KvOptions(storage="fp4")


def test_the_window_changes_nothing_but_what_attention_reads(model):
    reference = make(model, KvOptions())
    expected = drive(reference)
    reference.close()

    windowed = make(model, KvOptions("window"))
    lengths: list[int] = []
    original_begin = windowed.kv_window.begin

    def begin(rows: np.ndarray) -> int:
        lengths.append(original_begin(rows))
        return lengths[-1]

    windowed.kv_window.begin = begin
    got = drive(windowed)
    caches = windowed_caches(model.lm)
    windowed.close()

    assert identical(expected, got)
    assert sum(o.audio is not None for row in got for o in row) > 2 * STEPS  # the calls were answered
    # Short reads while the rings filled, then the whole ring once one had wrapped (it stays full).
    assert lengths[0] == 7 and lengths[-1] == 100 and sorted(set(lengths)) == [7, 13, 25, 50, 100]
    assert lengths == sorted(lengths)
    # The host's count is what the device's caches hold: slot 2 was reset at step 150.
    assert len(caches) == len(model.lm.transformer.layers)
    for cache in caches:
        assert np.minimum(cache.end_offset.numpy(), 100).tolist() == windowed.kv_window.filled.tolist()
    assert windowed.kv_window.filled[0] == 100 and windowed.kv_window.filled[2] < 100


def test_warm_up_uses_every_window_length(model):
    stepper = make(model, KvOptions("window"))
    stepper.warm_up()
    try:
        assert stepper.kv_window.used == set(stepper.kv_window.buckets)
        assert stepper.kv_window.filled.tolist() == [0] * BATCH  # handed over cleared
    finally:
        stepper.close()


def test_8_bit_storage_holds_one_byte_a_value(model):
    full = kv_bytes_per_slot(model.lm)  # moshi's ring, in the model's dtype (float32 here, bf16 on a GPU)
    itemsize = torch.finfo(model.lm.dtype).bits // 8
    values = full // itemsize
    head_dim = model.lm.dim // model.lm.transformer.layers[0].self_attn.num_heads
    # int8 adds a scale (in the model's dtype) per head and entry: at 7B size (bf16, 128 values a head)
    # 0.508 of the bf16 ring.
    for storage, expected in (("fp8", values), ("int8", values + values // head_dim * itemsize)):
        stepper = make(model, KvOptions(storage=storage))
        try:
            assert kv_bytes_per_slot(model.lm) == expected, storage
            assert all(c.cache.dtype == kv_compat.KV_DTYPES[storage] for c in windowed_caches(model.lm))
        finally:
            stepper.close()


def test_int8_logits_stay_close_to_the_model_dtype():
    """Slot 0's text logits, int8 cache against the model's own: compared over the first 40 steps, before
    the chaotic random tiny model's paths part (bench/kv_agreement.py measures 500+ steps at real size)."""
    model = load_model(ModelSource("tiny"), torch.device("cpu"), torch.float32)

    reference = drive_with_logits(model, KvOptions(), 40)[1]
    median_error = {}
    for storage in ("int8", "fp8"):
        other = drive_with_logits(model, KvOptions(storage=storage), 40)[1]
        errors = [float((a - b).abs().max() / a.std()) for a, b in zip(reference, other, strict=True)]
        assert len(errors) > 30
        median_error[storage] = float(np.median(errors))
    # Measured: int8 with its scales 0.009 of the logits' spread; fp8 e4m3 (no scales) parts paths at once.
    assert 0 < median_error["int8"] < 0.05
    assert median_error["fp8"] > 3 * median_error["int8"]


# -- the fused kernel (server/model/decode_attention.py) ------------------------------------------------------


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Triton's interpreter runs the CUDA kernel's code on the CPU (set before the kernel is first built)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(decode_attention, "_kernel", None)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy, inside Triton's interpreter
@pytest.mark.parametrize("stored", ["float32", "int8"])
def test_the_fused_kernel_reads_each_row_over_its_own_entries(triton_interpreter, stored):
    torch.manual_seed(3)
    block = decode_attention.BLOCK_N
    lengths = torch.tensor([0, 1, block - 1, block, block + 1, 3 * block])
    batch, heads, capacity, dim = len(lengths), 2, 3 * block, 16
    if stored == "int8":
        cache = torch.randint(-127, 128, (2, batch, heads, capacity, dim), dtype=torch.int8)
        scales = 0.02 * torch.rand(2, batch, heads, capacity, 1)
    else:
        cache, scales = torch.randn(2, batch, heads, capacity, dim), None
    q = torch.randn(batch, heads, dim)
    assert decode_attention.kernel_available(q.device)
    got = decode_attention.attend(q, cache, scales, lengths, capacity)
    expected = decode_attention.reference(q, cache, scales, lengths, capacity)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert got[0].abs().max() == 0  # no entries (a row that does not execute): zeros, not NaN
    # Entries past a row's length are never read: garbage there changes nothing.
    spoiled = cache.clone()
    for row, length in enumerate(lengths.tolist()):
        spoiled[:, row, :, length:] = 100 if stored == "int8" else float("nan")
    assert torch.equal(decode_attention.attend(q, spoiled, scales, lengths, capacity), got)
    # A row's result does not depend on its neighbours: the same row alone is the same, bit for bit.
    alone = decode_attention.attend(q[4:5], cache[:, 4:5].contiguous(), None if scales is None else
                                    scales[:, 4:5].contiguous(), lengths[4:5], capacity)
    assert torch.equal(alone[0], got[4])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy, inside Triton's interpreter
def test_fused_attention_follows_moshis_ring_and_hands_moshis_forward_back(monkeypatch):
    """The tiny model past its ring's wrap: our attention (torch's reference of the kernel here) against
    moshi's; then a few steps with the kernel itself (Triton's interpreter) against that reference."""
    model = load_model(ModelSource("tiny"), torch.device("cpu"), torch.float32)

    def run(kv: KvOptions, steps: int) -> tuple[list[list[SlotOutput]], list[torch.Tensor]]:
        return drive_with_logits(model, kv, steps)

    ring, ring_logits = run(KvOptions(), 120)
    fused, fused_logits = run(KvOptions("fused"), 120)
    for a, b in zip(ring_logits, fused_logits, strict=True):
        assert torch.allclose(a, b, atol=1e-4 * float(a.std()))  # summed in another order: 2e-6 measured
    assert [[o.text for o in row] for row in ring] == [[o.text for o in row] for row in fused]
    # Closing the stepper gave moshi its forward back: the same model then runs moshi's attention again.
    assert all("forward" not in vars(layer.self_attn) for layer in model.lm.transformer.layers)
    assert identical(run(KvOptions(), 120)[0], ring)

    if importlib.util.find_spec("triton") is None:
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(decode_attention, "_kernel", None)
    kernel, kernel_logits = run(KvOptions("fused", "int8"), 8)
    monkeypatch.delenv("TRITON_INTERPRET")
    reference, reference_logits = run(KvOptions("fused", "int8"), 8)
    for a, b in zip(reference_logits, kernel_logits, strict=True):
        assert torch.allclose(a, b, atol=1e-4 * float(a.std()))
    assert [[o.text for o in row] for row in kernel] == [[o.text for o in row] for row in reference]


def test_a_call_made_old_for_a_benchmark_reads_a_full_ring_of_zeros_never_an_earlier_call():
    model = load_model(ModelSource("tiny"), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="own KV caches"):
        KvOptions(bench_age=150)
    old = KvOptions("fused", bench_age=150)  # past the tiny ring's 100 frames

    def call_b(stepper: MoshiStepper) -> list[SlotOutput]:
        stepper.reset_slots([0], [7])
        assert stepper.kv_window.filled[0] == 100
        assert all(int(c.end_offset[0]) == 150 for c in windowed_caches(model.lm))
        rng = np.random.default_rng(11)
        rows = np.array([True, False, False])
        return [stepper.step((0.1 * rng.standard_normal((BATCH, stepper.frame_size))).astype(np.float32),
                             rows)[0] for _ in range(20)]

    after_another = make(model, old)
    try:
        drive(after_another, 30)  # call A fills slot 0's ring first
        b_after_a = call_b(after_another)
    finally:
        after_another.close()
    fresh = make(model, old)
    try:
        b_alone = call_b(fresh)
    finally:
        fresh.close()
    assert sum(o.audio is not None for o in b_alone) > 10
    assert identical([b_after_a], [b_alone])  # call A left nothing in the slot B was made old in
