"""Personas for PersonaPlex-style models: who answers (a text prompt) and with what voice.

A persona is chosen per call (web page, `/offer` JSON, WHIP query) and checked
here before the call starts: a prompt that is too long, or a voice the server
does not hold, is a `PersonaError` whose message the client gets in a 400.

A checked persona becomes a `PromptPlan`: the tokens to force, frame by frame,
through the model at the start of the call, in PersonaPlex's order:

1. the voice prompt: the model's own audio channels carry the voice clip's
   Mimi codes (or a precomputed prompt replays its saved embeddings),
2. 0.5 s of silence,
3. the text prompt, `<system> ... <system>`, one text token per frame,
4. 0.5 s of silence.

Throughout, the text channel is padding unless it carries the prompt, the
model's audio is the codes of silence unless it carries the voice, and the
caller's channels carry the codes of a 440 Hz tone, as the model was trained.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sentencepiece

if TYPE_CHECKING:  # torch is imported where a voice is loaded: media workers never load one
    import torch

log = logging.getLogger(__name__)

# PersonaPlex's Mimi codes (first 8 codebooks of the real Mimi) for a silent frame and a 440 Hz tone.
PERSONAPLEX_SILENCE_CODES = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
PERSONAPLEX_SINE_CODES = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
PERSONAPLEX_DEFAULT_PROMPT = (
    "You are a wise and friendly teacher. Answer questions or provide advice in a clear and engaging way."
)
SILENCE_FRAMES = 6  # 0.5 s at 12.5 Hz, after the voice and after the text
VOICE_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a")
PRECOMPUTED_EXTENSION = ".pt"
_VOICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PersonaError(ValueError):
    """A persona the server cannot use; the message says why, for the caller."""


@dataclass(frozen=True)
class Persona:
    """What a caller asks for. `prompt=None`/`voice=None`: the server's default; `""`: none at all."""

    prompt: str | None = None
    voice: str | None = None

    @staticmethod
    def from_json(value: object) -> Persona | None:
        """Read the `persona` member of an offer: {"prompt": str, "voice": str}, both optional."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise PersonaError("persona must be a JSON object with optional string members prompt and voice")
        unknown = sorted(set(value) - {"prompt", "voice"})
        if unknown:
            raise PersonaError(f"persona has unknown members: {', '.join(unknown)} (allowed: prompt, voice)")
        for key in ("prompt", "voice"):
            if value.get(key) is not None and not isinstance(value[key], str):
                raise PersonaError(f"persona.{key} must be a string")
        return Persona(prompt=value.get("prompt"), voice=value.get("voice"))

    @staticmethod
    def from_query(query: dict[str, str]) -> Persona | None:
        """Read `prompt` and `voice` query parameters (WHIP); None when neither is there."""
        if "prompt" not in query and "voice" not in query:
            return None
        return Persona(prompt=query.get("prompt"), voice=query.get("voice"))


@dataclass(frozen=True)
class PersonaLimits:
    """How much prompt one call may replay: every token and voice frame costs one model step."""

    max_prompt_chars: int = 1000
    max_prompt_tokens: int = 300
    max_voice_seconds: float = 30.0


def wrap_system_tags(text: str) -> str:
    """PersonaPlex's framing of a text prompt: `<system> text <system>`, unless already framed."""
    text = text.strip()
    if text.startswith("<system>") and text.endswith("<system>"):
        return text
    return f"<system> {text} <system>"


@dataclass
class PrecomputedVoice:
    """A PersonaPlex `.pt` voice: one backbone input embedding per prompt step, and the token cache after them."""

    embeddings: torch.Tensor  # [steps, 1, dim]
    cache: torch.Tensor  # [channels, cache_length]


@dataclass
class Voice:
    """One voice of the library: Mimi codes of a clip ([frames, codebooks]) or a precomputed prompt."""

    name: str
    source: Path
    codes: np.ndarray | None = None
    precomputed: PrecomputedVoice | None = None

    @property
    def steps(self) -> int:
        if self.codes is not None:
            return len(self.codes)
        return 1 + len(self.precomputed.embeddings)


@dataclass
class PromptPlan:
    """The forced tokens of one call's prompt, `given[step, channel]`, and where embeddings replace tokens.

    Channels: 0 text, 1..n the model's audio, n+1..2n the caller's audio. Steps `1..len(embeddings)`
    feed `embeddings[step - 1]` to the backbone; after them the slot's cache becomes `cache_after`.
    """

    given: np.ndarray
    embeddings: torch.Tensor | None = None
    cache_after: torch.Tensor | None = None
    description: str = ""

    @property
    def steps(self) -> int:
        return len(self.given)


@dataclass
class PromptBook:
    """The server's voices, limits and defaults, and the one place a persona becomes a plan."""

    tokenizer: sentencepiece.SentencePieceProcessor
    voices: dict[str, Voice]
    silence_codes: np.ndarray  # [codebooks]
    sine_codes: np.ndarray  # [codebooks]
    text_padding_id: int
    initial_audio_id: int
    limits: PersonaLimits = field(default_factory=PersonaLimits)
    default_prompt: str = PERSONAPLEX_DEFAULT_PROMPT
    default_voice: str | None = None

    @property
    def codebooks(self) -> int:
        return len(self.silence_codes)

    def describe(self) -> dict:
        """What a client may choose from: sent by /personas and shown by the page."""
        return {
            "voices": sorted(self.voices),
            "default_voice": self.default_voice,
            "default_prompt": self.default_prompt,
            "max_prompt_chars": self.limits.max_prompt_chars,
            "max_prompt_tokens": self.limits.max_prompt_tokens,
        }

    def prompt_tokens(self, prompt: str) -> list[int]:
        if len(prompt) > self.limits.max_prompt_chars:
            raise PersonaError(
                f"the prompt is {len(prompt)} characters long; this server takes at most "
                f"{self.limits.max_prompt_chars}"
            )
        tokens = self.tokenizer.encode(wrap_system_tags(prompt))
        if len(tokens) > self.limits.max_prompt_tokens:
            raise PersonaError(
                f"the prompt is {len(tokens)} tokens long; this server takes at most {self.limits.max_prompt_tokens}"
            )
        return tokens

    def voice(self, name: str) -> Voice:
        stem = name
        for extension in (*VOICE_EXTENSIONS, PRECOMPUTED_EXTENSION):
            stem = stem.removesuffix(extension)
        if stem not in self.voices:
            held = ", ".join(sorted(self.voices)) or "none"
            raise PersonaError(f"unknown voice {name!r}; this server's voices: {held}")
        return self.voices[stem]

    def plan(self, persona: Persona | None) -> PromptPlan:
        """Check a persona and turn it into forced tokens; raises PersonaError naming what is wrong."""
        persona = persona or Persona()
        prompt = self.default_prompt if persona.prompt is None else persona.prompt
        voice_name = self.default_voice if persona.voice is None else persona.voice
        text = self.prompt_tokens(prompt) if prompt.strip() else []
        voice = self.voice(voice_name) if voice_name else None

        rows: list[np.ndarray] = []
        embeddings = cache_after = None
        if voice is not None and voice.codes is not None:
            rows += [self._row(self.text_padding_id, codes) for codes in voice.codes]
        elif voice is not None:
            filler = np.full(self.codebooks, self.initial_audio_id)
            rows += [self._row(self.text_padding_id, filler, caller=filler)] * voice.steps
            embeddings, cache_after = voice.precomputed.embeddings, voice.precomputed.cache
        rows += [self._row(self.text_padding_id, self.silence_codes)] * SILENCE_FRAMES
        rows += [self._row(token, self.silence_codes) for token in text]
        rows += [self._row(self.text_padding_id, self.silence_codes)] * SILENCE_FRAMES
        description = f"voice={voice.name if voice else 'none'} prompt_tokens={len(text)} steps={len(rows)}"
        return PromptPlan(np.stack(rows), embeddings, cache_after, description)

    def _row(self, text: int, model_audio: np.ndarray, caller: np.ndarray | None = None) -> np.ndarray:
        caller = self.sine_codes if caller is None else caller
        return np.concatenate([[text], model_audio, caller]).astype(np.int64)


def voice_files(folder: Path) -> list[Path]:
    """The clips and precomputed prompts in a voices folder, by name."""
    if not folder.is_dir():
        raise FileNotFoundError(f"voices folder {folder} does not exist")
    found = [
        path
        for path in sorted(folder.iterdir())
        if path.is_file() and path.suffix.lower() in (*VOICE_EXTENSIONS, PRECOMPUTED_EXTENSION)
    ]
    for path in found:
        if not _VOICE_NAME.match(path.stem):
            raise ValueError(f"voice file {path.name}: names may hold letters, digits, '_', '-' and '.' only")
    return found


def load_precomputed_voice(path: Path) -> PrecomputedVoice:
    """Read a PersonaPlex `.pt` voice ({"embeddings": [steps, 1, 1, dim], "cache": [1, K, CT]}), tensors only."""
    import torch

    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or "embeddings" not in saved or "cache" not in saved:
        raise ValueError(f"{path.name} is not a PersonaPlex voice prompt (needs 'embeddings' and 'cache')")
    embeddings, cache = saved["embeddings"], saved["cache"]
    if embeddings.dim() == 4:
        embeddings = embeddings[:, 0]
    if cache.dim() == 3:
        cache = cache[0]
    return PrecomputedVoice(embeddings=embeddings, cache=cache.long())


def save_precomputed_voice(voice: PrecomputedVoice, path: Path) -> None:
    """Write a voice in PersonaPlex's `.pt` layout: embeddings [steps, 1, 1, dim], cache [1, K, CT]."""
    import torch

    torch.save({"embeddings": voice.embeddings[:, None].contiguous(), "cache": voice.cache[None].contiguous()}, path)


def normalise_loudness(audio: np.ndarray, target_db: float = -24.0) -> np.ndarray:
    """Bring a clip to `target_db` of gated RMS over 400 ms blocks (BS.1770's gating, without K-weighting).

    PersonaPlex normalises voice clips to -24 LUFS; K-weighting shifts speech by about a decibel, so
    the gated RMS is close enough for choosing the level a clip is replayed at."""
    block = 9600  # 400 ms at 24 kHz
    blocks = [audio[i : i + block] for i in range(0, max(len(audio) - block + 1, 1), block // 4)]
    power = np.array([np.mean(np.square(b, dtype=np.float64)) for b in blocks if b.size])
    power = power[power > 10 ** (-70 / 10)]
    if power.size == 0:
        return audio
    power = power[power > np.mean(power) * 10 ** (-10 / 10)]
    level_db = 10 * np.log10(np.mean(power))
    gain = 10 ** ((target_db - level_db) / 20)
    return np.clip(audio * gain, -1.0, 1.0).astype(np.float32)
