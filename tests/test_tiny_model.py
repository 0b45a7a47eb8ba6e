"""The built-in tiny model: usable codebooks, readable text, honest labels, and a real checkpoint round trip."""

from __future__ import annotations

import json
import logging

import numpy as np
import torch
from conftest import noise_frames, run_call, tone_frames

from server.engine.setup import create_engine
from server.model.moshi_step import GREEDY
from server.model.source import ModelSource, load_model
from server.model.tiny_model import TINY_FILES, build_tiny_model, write_tiny_checkpoint


def test_codebooks_are_not_degenerate():
    model = build_tiny_model()
    fitted = [m for m in model.mimi.modules() if hasattr(m, "embedding_sum") and float(m.embedding_sum.abs().sum()) > 0]
    assert len(fitted) >= model.mimi.num_codebooks
    audio = torch.from_numpy(np.concatenate(noise_frames(0, 10) + tone_frames(440, 10)))[None, None]
    with torch.no_grad():
        codes = model.mimi.encode(audio)[0]  # [K, T]
    for codebook in codes:
        # A zero-initialised quantizer would give a single code everywhere.
        assert len(set(codebook.tolist())) >= 8


def test_decoder_output_depends_on_codes():
    model = build_tiny_model()
    generator = torch.Generator().manual_seed(0)
    codes_a = torch.randint(0, model.mimi.cardinality, (1, model.mimi.num_codebooks, 4), generator=generator)
    codes_b = torch.randint(0, model.mimi.cardinality, (1, model.mimi.num_codebooks, 4), generator=generator)
    with torch.no_grad():
        a, b = model.mimi.decode(codes_a), model.mimi.decode(codes_b)
    level = float(a.std())
    assert 0.01 < level < 0.5
    assert float((a - b).std()) > 0.3 * level


def test_text_tokenizer_gives_readable_pieces():
    model = build_tiny_model()
    tokenizer = model.text_tokenizer()
    assert tokenizer.vocab_size() == model.lm.text_card
    assert [tokenizer.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    pieces = [tokenizer.id_to_piece(i).replace("\u2581", "") for i in range(4, tokenizer.vocab_size())]
    assert sum(piece.isalpha() for piece in pieces) > 0.8 * len(pieces)
    assert tokenizer.decode(tokenizer.encode("hello there")) == "hello there"


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = build_tiny_model(seed=1), build_tiny_model(seed=1), build_tiny_model(seed=2)
    weight = "text_linear.weight"
    assert torch.equal(a.lm.state_dict()[weight], b.lm.state_dict()[weight])
    assert not torch.equal(a.lm.state_dict()[weight], c.lm.state_dict()[weight])


async def test_tiny_model_is_reported_as_a_test_model(caplog):
    engine = create_engine(ModelSource("tiny"), max_calls=1)
    with caplog.at_level(logging.INFO):
        await engine.start()
    try:
        assert engine.info.is_test_model
        assert "babbles" in engine.info.notice
        assert any("TEST MODEL" in r.getMessage() and r.levelno >= logging.WARNING for r in caplog.records)
    finally:
        await engine.stop()


async def test_checkpoint_directory_loads_through_the_moshiko_path_and_matches(tmp_path, monkeypatch):
    directory = write_tiny_checkpoint(tmp_path / "tiny-ckpt", seed=7)
    config = json.loads((directory / "config.json").read_text())
    for key in ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name"):
        assert (directory / config[key]).is_file()
    assert config["model_id"]["test_model"] is True

    # The directory must go through moshi's CheckpointInfo like a hub repo, without touching the hub.
    import moshi.models.loaders as loaders

    def no_hub(*args, **kwargs):
        raise AssertionError(f"hub download attempted: {args}")

    monkeypatch.setattr(loaders, "hf_hub_download", no_hub)
    calls = []
    original = loaders.CheckpointInfo.from_hf_repo
    monkeypatch.setattr(
        loaders.CheckpointInfo, "from_hf_repo", staticmethod(lambda *a, **k: calls.append(a) or original(*a, **k))
    )
    loaded = load_model(ModelSource(str(directory)), torch.device("cpu"), torch.float32)
    assert calls, "a checkpoint directory must load through CheckpointInfo.from_hf_repo"
    assert loaded.is_test_model

    frames = noise_frames(3, 10) + tone_frames(300, 6)
    outputs = []
    for source in (ModelSource("tiny", tiny_seed=7), ModelSource(str(directory))):
        engine = create_engine(source, max_calls=1, sampling=GREEDY)
        await engine.start()
        outputs.append(await run_call(engine, frames, seed=5))
        await engine.stop()
    in_memory, from_disk = outputs
    assert [r.text for r in in_memory] == [r.text for r in from_disk]
    assert np.array_equal(np.concatenate([r.audio for r in in_memory]), np.concatenate([r.audio for r in from_disk]))
    assert any(not r.silent for r in from_disk)


def test_checkpoint_file_names_are_the_configured_ones(tmp_path):
    directory = write_tiny_checkpoint(tmp_path / "ckpt")
    assert sorted(p.name for p in directory.iterdir()) == sorted(["config.json", *TINY_FILES.values()])
