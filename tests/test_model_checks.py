"""Inspect before inference: one load line with the layout, and a named refusal for each misfit."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from server.engine.setup import create_engine
from server.model.check import ModelMismatch
from server.model.moshi_step import MoshiStepper
from server.model.source import ModelSource, load_model
from server.model.tiny_model import build_tiny_model, write_tiny_checkpoint


def _tiny_loaded():
    return load_model(ModelSource("tiny"), torch.device("cpu"), torch.float32)


async def test_load_logs_one_line_with_the_layout(caplog):
    engine = create_engine(ModelSource("tiny"), max_calls=2)
    with caplog.at_level(logging.INFO):
        await engine.start()
    await engine.stop()
    lines = [r.getMessage() for r in caplog.records if "text_card=" in r.getMessage()]
    assert len(lines) == 1
    line = lines[0]
    for key in ("card", "text_card", "n_q", "dep_q", "delays", "mimi_codebooks", "sample_rate", "frame_size",
                "device", "dtype"):
        assert re.search(rf"\b{key}=", line), key
    assert "frame_size=1920" in line and "device=cpu" in line and "dtype=float32" in line


def test_refuses_mimi_with_fewer_codebooks_than_the_lm_reads():
    model = _tiny_loaded()
    model.mimi.set_num_codebooks(2)  # the tiny LM reads 4 of the caller's codebooks
    with pytest.raises(ModelMismatch, match=r"Mimi yields 2 codebooks but the LM reads 4"):
        MoshiStepper(model, batch_size=1)


def test_refuses_audio_cards_that_differ():
    model = _tiny_loaded()
    model.lm.card = 256  # Mimi's codebooks have 128 entries
    with pytest.raises(ModelMismatch, match=r"audio cards differ: Mimi codebooks have 128 entries, the LM's audio card is 256"):  # noqa: E501
        MoshiStepper(model, batch_size=1)


def test_refuses_a_frame_size_that_is_not_mimis():
    with pytest.raises(ModelMismatch, match=r"frame size 960 is not Mimi's: Mimi takes 1920 samples"):
        MoshiStepper(_tiny_loaded(), batch_size=1, frame_size=960)


def test_refuses_a_sample_rate_the_media_path_does_not_deliver():
    with pytest.raises(ModelMismatch, match=r"Mimi runs at 24000 Hz, the media path delivers 16000 Hz"):
        MoshiStepper(_tiny_loaded(), batch_size=1, sample_rate=16000)


def test_stock_generation_refuses_a_personaplex_layout():
    model = _tiny_loaded()
    model.lm.dep_q = model.lm.n_q  # PersonaPlex's dep_q=16 layout: stock LMGen would ignore the caller
    with pytest.raises(ModelMismatch, match=r"stock LMGen would silently ignore the caller; run it with PersonaStep"):
        MoshiStepper(model, batch_size=1)


def test_refuses_a_tokenizer_smaller_than_the_text_card():
    model = _tiny_loaded()
    model.lm.text_card = model.text_tokenizer.vocab_size() + 10
    with pytest.raises(ModelMismatch, match=r"text tokenizer has \d+ pieces but the LM's text_card is"):
        MoshiStepper(model, batch_size=1)


def test_refuses_a_config_with_keys_the_installed_moshi_does_not_know(tmp_path):
    directory = write_tiny_checkpoint(tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    config["attention_sinks"] = 4
    config["depformer_flux_capacitor"] = True
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelMismatch, match=r"does not know: attention_sinks, depformer_flux_capacitor"):
        load_model(ModelSource(str(directory)), torch.device("cpu"), torch.float32)


async def test_a_refused_model_fails_engine_start_with_the_message(tmp_path):
    directory = write_tiny_checkpoint(tmp_path / "ckpt")
    engine = create_engine(ModelSource(str(directory)), max_calls=1, frame_size=960)
    with pytest.raises(ModelMismatch, match="frame size 960 is not Mimi's"):
        await engine.start()
    assert not engine.ready
    with pytest.raises(RuntimeError, match="warming up"):
        await engine.open_call()
    await engine.stop()


def test_the_real_moshiko_config_passes_the_key_check():
    from moshi.models.loaders import _lm_kwargs

    from server.model.check import check_config_keys

    check_config_keys(dict(_lm_kwargs))  # the stock 7B config: every key is known
    check_config_keys(build_tiny_model().lm_config)
