"""The real-size random models (`random-moshiko`, `random-personaplex`) as far as a CPU can check them.

The 7B itself runs only on a GPU host (tests/test_cuda.py). Here: the names load through the same
path as every source, the layout is moshiko's or PersonaPlex's, the Mimi's codes depend on its
input (a random quantizer would give all zeros), and the placeholder tokenizer fits the text card.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import noise_frames, tone_frames

from server.model.check import check_layout, read_layout
from server.model.random_model import RANDOM_MOSHIKO, RANDOM_PERSONAPLEX, build_random_model
from server.model.source import ModelSource


@pytest.fixture(scope="module")
def moshiko():
    return build_random_model(RANDOM_MOSHIKO, torch.device("cpu"), torch.float32, lm_layers=1)


def test_random_names_are_sources_without_a_checkpoint():
    source = ModelSource(RANDOM_MOSHIKO)
    assert source.is_random and not source.is_tiny and not source.is_echo
    with pytest.raises(ValueError, match="has no checkpoint"):
        source.checkpoint_info()
    with pytest.raises(ValueError, match="unknown random model"):
        build_random_model("random-gpt", torch.device("cpu"), torch.float32)


def test_random_moshiko_has_moshikos_layout_and_says_it_is_a_test_model(moshiko):
    layout = read_layout(moshiko.mimi, moshiko.lm, moshiko.text_tokenizer)
    check_layout(layout, sample_rate=24000, frame_size=1920)
    assert (layout.card, layout.text_card, layout.n_q, layout.dep_q, layout.kind) == (2048, 32000, 16, 8, "moshi")
    assert moshiko.lm.dim == 4096 and moshiko.is_test_model
    assert "TEST MODEL" in moshiko.notice and "SMOKE" in moshiko.name  # one layer: never a real figure


def test_its_mimi_codes_depend_on_the_input(moshiko):
    def codes(frames):
        with torch.no_grad():
            return moshiko.mimi.encode(torch.from_numpy(np.concatenate(frames))[None, None]).numpy()

    noise, tone = codes(noise_frames(1, 4)), codes(tone_frames(440, 4))
    assert noise.shape == (1, 8, 4)
    assert not np.array_equal(noise, tone)
    assert len(np.unique(noise)) > 4  # a random quantizer's codebooks would give zeros only


def test_random_personaplex_is_moshi_7b_with_dep_q_16():
    from moshi.models import loaders

    from server.model.random_model import random_lm_overrides

    lm = loaders.get_moshi_lm(None, device="meta", lm_kwargs_overrides=random_lm_overrides(persona=True))
    assert (lm.dim, len(lm.transformer.layers), lm.n_q, lm.dep_q, lm.card) == (4096, 32, 16, 16, 2048)
    assert RANDOM_PERSONAPLEX == "random-personaplex"


def test_the_placeholder_tokenizer_fits_the_text_card(moshiko):
    tokenizer = moshiko.text_tokenizer
    assert tokenizer.vocab_size() == moshiko.lm.text_card
    ids = tokenizer.encode("You enjoy having a good conversation.")
    assert len(ids) == 12 and all(4 <= i < tokenizer.vocab_size() for i in ids)
    assert tokenizer.id_to_piece(1234) == "<1234>" and tokenizer.is_control(1)
