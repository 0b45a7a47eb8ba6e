"""Inspect a model before inference and refuse pieces that do not fit.

Teams that guessed at vocabulary sizes and codebook counts crashed the GPU or
fed text tokens to the audio decoder. Here the numbers are read off the
loaded objects, logged in one line, and checked; a mismatch stops start-up
with a message that names it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import sentencepiece
import torch
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel
from moshi.modules.transformer import StreamingTransformer, StreamingTransformerLayer


class ModelMismatch(RuntimeError):
    """The model's pieces do not fit together; the engine refuses to start."""


@dataclass(frozen=True)
class ModelLayout:
    """The numbers that decide how tokens and audio flow through the engine."""

    card: int
    text_card: int
    n_q: int
    dep_q: int
    delays: tuple[int, ...]
    mimi_codebooks: int
    mimi_cardinality: int
    sample_rate: int
    frame_size: int
    tokenizer_size: int
    device: str
    dtype: str

    @property
    def kind(self) -> str:
        """`personaplex` when the depth transformer also predicts the caller (n_q == dep_q), else `moshi`."""
        return "personaplex" if self.n_q == self.dep_q else "moshi"

    @property
    def takes_persona(self) -> bool:
        return self.kind == "personaplex"

    @property
    def model_codebooks(self) -> int:
        """How many codebooks of the model's own voice each step yields; only these go to Mimi's decoder."""
        return self.dep_q // 2 if self.takes_persona else self.dep_q

    @property
    def user_codebooks(self) -> int:
        """How many of Mimi's codebooks the LM reads from the caller's audio."""
        return self.dep_q // 2 if self.takes_persona else self.n_q - self.dep_q

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    def describe(self) -> str:
        return (
            f"kind={self.kind} card={self.card} text_card={self.text_card} n_q={self.n_q} dep_q={self.dep_q} "
            f"model_codebooks={self.model_codebooks} user_codebooks={self.user_codebooks} delays={list(self.delays)} "
            f"mimi_codebooks={self.mimi_codebooks} mimi_cardinality={self.mimi_cardinality} "
            f"tokenizer_size={self.tokenizer_size} sample_rate={self.sample_rate} "
            f"frame_size={self.frame_size} device={self.device} dtype={self.dtype}"
        )


def read_layout(mimi: MimiModel, lm: LMModel, tokenizer: sentencepiece.SentencePieceProcessor) -> ModelLayout:
    return ModelLayout(
        card=lm.card,
        text_card=lm.text_card,
        n_q=lm.n_q,
        dep_q=lm.dep_q,
        delays=tuple(lm.delays),
        mimi_codebooks=mimi.num_codebooks,
        mimi_cardinality=mimi.cardinality,
        sample_rate=mimi.sample_rate,
        frame_size=mimi.frame_size,
        tokenizer_size=tokenizer.vocab_size(),
        device=str(lm.device),
        dtype=str(lm.dtype).removeprefix("torch."),
    )


def check_layout(layout: ModelLayout, *, sample_rate: int, frame_size: int | None = None) -> None:
    """Raise ModelMismatch naming the first thing that does not fit."""
    if layout.n_q < layout.dep_q:
        raise ModelMismatch(f"the LM generates dep_q={layout.dep_q} codebooks out of only n_q={layout.n_q}")
    if layout.takes_persona and layout.dep_q % 2:
        raise ModelMismatch(
            f"n_q == dep_q == {layout.dep_q} looks like a PersonaPlex layout, but it needs an even dep_q "
            "(half the model's voice, half the caller's)"
        )
    if layout.mimi_codebooks < layout.user_codebooks:
        raise ModelMismatch(
            f"Mimi yields {layout.mimi_codebooks} codebooks but the LM reads {layout.user_codebooks} "
            f"from the caller (n_q={layout.n_q}, dep_q={layout.dep_q})"
        )
    if layout.mimi_codebooks < layout.model_codebooks:
        raise ModelMismatch(
            f"Mimi decodes {layout.mimi_codebooks} codebooks but the LM generates {layout.model_codebooks} "
            "of its own voice"
        )
    if layout.mimi_cardinality != layout.card:
        raise ModelMismatch(
            f"audio cards differ: Mimi codebooks have {layout.mimi_cardinality} entries, "
            f"the LM's audio card is {layout.card}"
        )
    if layout.tokenizer_size < layout.text_card:
        raise ModelMismatch(
            f"the text tokenizer has {layout.tokenizer_size} pieces but the LM's text_card is "
            f"{layout.text_card}: some text ids could not be turned into text"
        )
    if layout.sample_rate != sample_rate:
        raise ModelMismatch(f"Mimi runs at {layout.sample_rate} Hz, the media path delivers {sample_rate} Hz")
    if frame_size is not None and frame_size != layout.frame_size:
        raise ModelMismatch(
            f"frame size {frame_size} is not Mimi's: Mimi takes {layout.frame_size} samples "
            f"({1000 * layout.frame_size / layout.sample_rate:g} ms) per frame"
        )
    if len(layout.delays) != layout.n_q + 1:
        raise ModelMismatch(f"{len(layout.delays)} delays for {layout.n_q + 1} streams")


# Keys that moshi's loader takes out of config.json before building the LM
# (CheckpointInfo.from_hf_repo and get_moshi_lm), so the LM never sees them.
_LOADER_KEYS = {
    "moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name", "model_type",
    "lm_gen_config", "tts_config", "stt_config", "model_id", "conditioners", "fuser", "lora",
    "lora_rank", "lora_scaling", "depformer_causal", "demux_second_stream",
}  # fmt: skip


def _parameters(fn) -> set[str]:
    return {
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name != "self"
    }


def known_config_keys() -> set[str]:
    """Every key the installed moshi accepts in a checkpoint's config.json."""
    transformer = _parameters(StreamingTransformer.__init__) | _parameters(StreamingTransformerLayer.__init__)
    return _LOADER_KEYS | _parameters(LMModel.__init__) | transformer | {f"depformer_{k}" for k in transformer}


def check_config_keys(config: dict | None) -> None:
    """Refuse a config.json written for another moshi version instead of failing deep inside it."""
    if config is None:
        return
    unknown = sorted(set(config) - known_config_keys())
    if unknown:
        import moshi

        raise ModelMismatch(
            f"config.json has keys the installed moshi {getattr(moshi, '__version__', '?')} "
            f"does not know: {', '.join(unknown)}"
        )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU runs it well, float32 on the CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
