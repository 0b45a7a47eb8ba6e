"""Real-size test models: moshiko's and PersonaPlex's architectures with random weights.

They exist for a GPU host with no model hub and no weights: the engine, the
CUDA graphs and the media path run at the real size (7B LM, full Mimi), so
step time, memory and capacity are the real figures, and CUDA-only tests
can check the batched path at the size that runs in production. They
babble; every report of them says so.

Built with moshi's own `get_mimi` / `get_moshi_lm` from moshi's built-in 7B
config (PersonaPlex: the same with dep_q=16, as its loader does). Mimi gets
the tiny model's treatment (He-initialised convolutions, codebooks fitted by
moshi's k-means, a levelled decoder), so codes depend on the input and the
decoder's output has speech-like levels. The text tokenizer is a placeholder
of the right size: ids turn into `<id>` pieces.
"""

from __future__ import annotations

import torch
from moshi.models import loaders

from .source import RANDOM_MODELS, LoadedModel
from .tiny_model import fit_codebooks, he_init_convolutions, level_decoder_output

RANDOM_MOSHIKO, RANDOM_PERSONAPLEX = RANDOM_MODELS
RANDOM_DEFAULT_SEED = 20261123


class PlaceholderTokenizer:
    """Stands in for moshiko's 32k sentencepiece model (not on a host without the hub)."""

    def __init__(self, size: int):
        self.size = size

    def vocab_size(self) -> int:
        return self.size

    def id_to_piece(self, token: int) -> str:
        return f"<{token}>"

    def is_control(self, token: int) -> bool:
        return token in (1, 2)

    def encode(self, text: str) -> list[int]:
        """Two ids per word, so a persona prompt replays about as many steps as a real one would."""
        return [4 + (len(word) + i) % (self.size - 4) for word in text.split() for i in range(2)]


def random_lm_overrides(persona: bool, lm_layers: int | None = None) -> dict:
    """Changes to moshi's built-in 7B config: dep_q=16 for PersonaPlex; fewer layers for smoke runs only."""
    overrides: dict = {}
    if persona:
        overrides["dep_q"] = 16
    if lm_layers is not None:
        overrides["num_layers"] = lm_layers
    return overrides


def build_random_model(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = RANDOM_DEFAULT_SEED,
    lm_layers: int | None = None,
) -> LoadedModel:
    """`name` is `random-moshiko` or `random-personaplex`. The same seed gives the same weights on one device."""
    if name not in RANDOM_MODELS:
        raise ValueError(f"unknown random model {name!r}; choose one of {', '.join(RANDOM_MODELS)}")
    overrides = random_lm_overrides(name == RANDOM_PERSONAPLEX, lm_layers)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        # No config given: moshi's loader builds its built-in 7B architecture, with our overrides.
        lm = loaders.get_moshi_lm(None, device=device, dtype=dtype, lm_kwargs_overrides=overrides)
        mimi = loaders.get_mimi(None, device=device, num_codebooks=max(lm.dep_q, lm.n_q - lm.dep_q))
        he_init_convolutions(mimi)
        fit_codebooks(mimi, torch.Generator().manual_seed(seed))
        level_decoder_output(mimi, torch.Generator().manual_seed(seed + 1))
    lm.eval()
    label = name if lm_layers is None else f"{name}-{lm_layers}-layers-SMOKE"
    return LoadedModel(label, mimi, lm, PlaceholderTokenizer(lm.text_card), is_test_model=True)
