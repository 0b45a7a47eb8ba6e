"""Where the model comes from, and loading it through moshi's own loaders.

A source is one of:
- a Hugging Face repo id (default `kyutai/moshiko-pytorch-bf16`, optional
  revision), with the same per-file overrides `python -m moshi.server` takes
  (Moshi weights, Mimi weights, tokenizer, config.json, LoRA weights);
- a local checkpoint directory (config.json naming its files, as in a repo);
- `tiny`: the built-in random test model (see `server.model.tiny_model`);
- `tiny-persona`: the same, in PersonaPlex's layout (the depth transformer
  also predicts the caller's codebooks);
- `echo`: no model at all; the engine hands audio back (see `server.model.echo_step`);
- `random-moshiko`, `random-personaplex`: the real-size architectures with
  random weights, for a GPU host without weights (see `server.model.random_model`).

Repo ids and directories both become a `moshi.models.loaders.CheckpointInfo`
and go through the same `load_checkpoint`, so a tiny checkpoint written to
disk exercises the exact path that loads moshiko.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece
import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel

from . import moshi_compat
from .check import check_config_keys
from .tiny_model import (
    TINY_DEFAULT_SEED,
    TINY_MODEL_NAME,
    TINY_PERSONA_MODEL_NAME,
    build_tiny_model,
    random_weights_notice,
)

log = logging.getLogger(__name__)

TINY = "tiny"
RANDOM_MODELS = ("random-moshiko", "random-personaplex")  # server.model.random_model builds them
TINY_PERSONA = "tiny-persona"
ECHO = "echo"
PERSONAPLEX_MODEL_TYPE = "personaplex"


@dataclass(frozen=True)
class ModelSource:
    """What to load. `model` is `tiny`, `echo`, a local directory, or a Hugging Face repo id."""

    model: str = loaders.DEFAULT_REPO
    revision: str | None = None
    moshi_weight: str | None = None
    mimi_weight: str | None = None
    tokenizer: str | None = None
    config_path: str | None = None
    lora_weight: str | None = None
    tiny_seed: int = TINY_DEFAULT_SEED

    @property
    def is_echo(self) -> bool:
        return self.model == ECHO

    @property
    def is_tiny(self) -> bool:
        return self.model in (TINY, TINY_PERSONA)

    @property
    def is_random(self) -> bool:
        return self.model in RANDOM_MODELS

    @property
    def is_directory(self) -> bool:
        return Path(self.model).is_dir()

    def checkpoint_info(self) -> loaders.CheckpointInfo:
        """Resolve a repo id or directory to moshi's CheckpointInfo (downloads for a repo id)."""
        if self.is_echo or self.is_tiny or self.is_random:
            raise ValueError(f"{self.model!r} has no checkpoint")
        if self.is_directory:
            return _directory_checkpoint(Path(self.model), self)
        return loaders.CheckpointInfo.from_hf_repo(
            self.model,
            moshi_weights=self.moshi_weight,
            mimi_weights=self.mimi_weight,
            tokenizer=self.tokenizer,
            config_path=self.config_path,
            lora_weights=self.lora_weight,
            revision=self.revision,
        )


def _directory_checkpoint(directory: Path, source: ModelSource) -> loaders.CheckpointInfo:
    """A local checkpoint: every file is resolved here, so the hub is never asked."""
    config_path = Path(source.config_path) if source.config_path else directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; pass the config path explicitly")
    config = json.loads(config_path.read_text())

    def local(override: str | None, key: str, default: str | None) -> Path | None:
        if override:
            return Path(override)
        name = config.get(key, default)
        if name is None:
            return None
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file {path} (config key {key!r}) is missing")
        return path

    return loaders.CheckpointInfo.from_hf_repo(
        str(directory),
        moshi_weights=local(source.moshi_weight, "moshi_name", loaders.MOSHI_NAME),
        mimi_weights=local(source.mimi_weight, "mimi_name", loaders.MIMI_NAME),
        tokenizer=local(source.tokenizer, "tokenizer_name", loaders.TEXT_TOKENIZER_NAME),
        config_path=config_path,
        mimi_config_path=local(None, "mimi_config_name", None),
        lora_weights=local(source.lora_weight, "lora_name", None),
    )


@dataclass
class LoadedModel:
    """The three pieces the engine runs, plus what to tell people about them."""

    name: str
    mimi: MimiModel
    lm: LMModel
    text_tokenizer: sentencepiece.SentencePieceProcessor
    is_test_model: bool = False
    model_type: str = "moshi"
    lm_gen_config: dict = field(default_factory=dict)

    @property
    def notice(self) -> str | None:
        return random_weights_notice(self.name) if self.is_test_model else None


def load_checkpoint(
    info: loaders.CheckpointInfo, name: str, device: torch.device, dtype: torch.dtype
) -> LoadedModel:
    """Load Mimi, the LM and the tokenizer from a CheckpointInfo; the one path for every checkpoint."""
    complete_personaplex_config(info)
    check_config_keys(info.lm_config)
    mimi = info.get_mimi(device=device)
    lm = info.get_moshi(device=device, dtype=dtype)
    return LoadedModel(
        name=name,
        mimi=mimi,
        lm=lm,
        text_tokenizer=info.get_text_tokenizer(),
        is_test_model=bool(info.model_id.get("test_model", False)),
        model_type=info.model_type,
        lm_gen_config=dict(info.lm_gen_config),
    )


def complete_personaplex_config(info: loaders.CheckpointInfo) -> None:
    """PersonaPlex's config.json may name only its type; its architecture is moshi's 7B with dep_q=16.

    Its own loader ignores config.json and sets dep_q=16 on moshi's built-in 7B config, so a config
    of model_type `personaplex` without the architecture (no `dim`) gets exactly that."""
    if info.model_type != PERSONAPLEX_MODEL_TYPE or (info.lm_config and "dim" in info.lm_config):
        return
    ignored = sorted(set(info.lm_config or {}))
    log.info("PersonaPlex checkpoint without an architecture in config.json: moshi's 7B with dep_q=16%s",
             f" (ignoring {', '.join(ignored)})" if ignored else "")
    info.lm_config = {**moshi_compat.moshi_7b_lm_kwargs(), "dep_q": 16}
    info.model_type = "moshi"  # conditioning and sampling as Moshi's


def load_model(source: ModelSource, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load any non-echo source."""
    if source.is_echo:
        raise ValueError("the echo engine has no model to load")
    if source.is_tiny:
        persona = source.model == TINY_PERSONA
        tiny = build_tiny_model(source.tiny_seed, device=device, persona=persona)
        return LoadedModel(
            name=TINY_PERSONA_MODEL_NAME if persona else TINY_MODEL_NAME,
            mimi=tiny.mimi,
            lm=tiny.lm.to(dtype=dtype),
            text_tokenizer=tiny.text_tokenizer(),
            is_test_model=True,
        )
    if source.is_random:
        from .random_model import build_random_model  # it builds on LoadedModel, defined here

        log.info("building %s: real-size architecture, random weights", source.model)
        return build_random_model(source.model, device, dtype)
    log.info("retrieving checkpoint %s", source.model)
    info = source.checkpoint_info()
    name = source.model if not source.revision else f"{source.model}@{source.revision}"
    return load_checkpoint(info, name, device, dtype)
