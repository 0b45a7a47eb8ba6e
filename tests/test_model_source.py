"""Model sources: repo ids go through moshi's hub loader with the revision and overrides asked for."""

from __future__ import annotations

import moshi.models.loaders as loaders
import pytest
import torch

from server.model.moshi_step import MoshiStepper, SamplingConfig
from server.model.source import ModelSource, load_model
from server.model.tiny_model import write_tiny_checkpoint


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """The hub is not reachable from tests: serve a repo's files from a tiny checkpoint directory."""
    directory = write_tiny_checkpoint(tmp_path / "hub-repo", seed=11)
    asked: list[tuple[str, str, str | None]] = []

    def hf_hub_download(repo_id, filename, revision=None, **kwargs):
        asked.append((repo_id, filename, revision))
        path = directory / filename
        if not path.is_file():
            raise FileNotFoundError(filename)
        return str(path)

    monkeypatch.setattr(loaders, "hf_hub_download", hf_hub_download)
    return directory, asked


def test_a_repo_id_loads_through_the_hub_path_with_its_revision(offline_hub):
    directory, asked = offline_hub
    loaded = load_model(ModelSource("someone/moshi-variant", revision="v2"), torch.device("cpu"), torch.float32)
    assert {name for _, name, _ in asked} == {"config.json", "model.safetensors", "mimi.safetensors",
                                              "mimi_config.json", "tokenizer.model"}
    assert all(repo == "someone/moshi-variant" and rev == "v2" for repo, _, rev in asked)
    assert loaded.name == "someone/moshi-variant@v2" and loaded.is_test_model


def test_per_file_overrides_skip_the_hub_for_those_files(offline_hub):
    directory, asked = offline_hub
    load_model(
        ModelSource("someone/moshi-variant", moshi_weight=str(directory / "model.safetensors"),
                    tokenizer=str(directory / "tokenizer.model")),
        torch.device("cpu"),
        torch.float32,
    )
    fetched = {name for _, name, _ in asked}
    assert "model.safetensors" not in fetched and "tokenizer.model" not in fetched
    assert "mimi.safetensors" in fetched


def test_a_missing_local_file_is_named(tmp_path):
    directory = write_tiny_checkpoint(tmp_path / "ckpt")
    (directory / "mimi.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="mimi.safetensors"):
        load_model(ModelSource(str(directory)), torch.device("cpu"), torch.float32)


def test_sampling_settings_reach_lmgen_over_checkpoint_defaults():
    model = load_model(ModelSource("tiny"), torch.device("cpu"), torch.float32)
    model.lm_gen_config = {"temp": 0.6, "top_k": 100, "temp_text": 0.5}
    stepper = MoshiStepper(model, 1, SamplingConfig(temp=0.9, top_k_text=5))
    gen = stepper.generator
    assert (gen.temp, gen.top_k, gen.temp_text, gen.top_k_text) == (0.9, 100, 0.5, 5)
    assert gen.use_sampling
    stepper.close()
