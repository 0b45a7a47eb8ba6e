"""The batched step for PersonaPlex-style models, with per-slot persona prompts.

Same Mimi path as `MoshiStepper` (one Mimi encodes and decodes, first frame
dropped, codes checked); the generator is `PersonaGen`, which forces the
caller's codebooks into the depth steps that predict them, and only the
model's own codebooks are decoded.

A slot that starts a call replays its `PromptPlan` one frame per step. It
rides along in every step the engine runs for other callers (a batched step
costs the same with one more row), and the engine runs prompt-only steps when
no caller frame is waiting, so neighbours never wait more than one step.
While a slot replays, its caller's frames are answered with silence and not
fed to the model, as PersonaPlex's own server does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..audio.inbound import read_audio_file
from .check import ModelLayout, ModelMismatch, check_layout, read_layout
from .kv_compat import KvOptions
from .moshi_step import MoshiStepper, SamplingConfig
from .persona import (
    PERSONAPLEX_SILENCE_CODES,
    PERSONAPLEX_SINE_CODES,
    PRECOMPUTED_EXTENSION,
    Persona,
    PersonaLimits,
    PrecomputedVoice,
    PromptBook,
    PromptPlan,
    Voice,
    load_precomputed_voice,
    normalise_loudness,
    voice_files,
)
from .persona_gen import UNGENERATED, PersonaGen
from .source import LoadedModel
from .stepper import SlotOutput

log = logging.getLogger(__name__)


@dataclass
class _PromptRun:
    plan: PromptPlan
    index: int = 0


@dataclass(frozen=True)
class VoiceOptions:
    """Where voices come from and what a call may ask for."""

    folder: Path | None = None
    synthetic: dict[str, np.ndarray] | None = None  # name -> 24 kHz clip, for test models
    limits: PersonaLimits = PersonaLimits()
    default_voice: str | None = None
    default_prompt: str | None = None


class PersonaStepper(MoshiStepper):
    """B call slots on one Mimi and one PersonaGen; each slot can replay a persona prompt."""

    runs_persona_layout = True

    def __init__(
        self,
        model: LoadedModel,
        batch_size: int,
        sampling_config: SamplingConfig = SamplingConfig(),  # noqa: B008 - frozen dataclass
        sample_rate: int = 24000,
        frame_size: int | None = None,
        voices: VoiceOptions = VoiceOptions(),  # noqa: B008 - frozen dataclass
        kv: KvOptions = KvOptions(),  # noqa: B008 - frozen dataclass
    ):
        layout = read_layout(model.mimi, model.lm, model.text_tokenizer)
        check_layout(layout, sample_rate=sample_rate, frame_size=frame_size)
        if not layout.takes_persona:
            raise ModelMismatch(f"{model.name} is a {layout.kind} model, not a PersonaPlex layout (n_q == dep_q)")
        # Voices are encoded before Mimi starts streaming for the slots.
        self.prompt_book = build_prompt_book(model, layout, voices)
        super().__init__(model, batch_size, sampling_config, sample_rate, frame_size, kv)
        self._runs: list[_PromptRun | None] = [None] * batch_size
        log.info("persona model: %d voices (%s), default voice %s", len(self.prompt_book.voices),
                 ", ".join(sorted(self.prompt_book.voices)) or "none", self.prompt_book.default_voice)

    def _make_generator(self, model: LoadedModel, gen_kwargs: dict) -> PersonaGen:
        return PersonaGen(model.lm, **gen_kwargs, window=self.kv_window, graph_by_window=self.kv.window)

    def _graph_by_window(self) -> None:
        pass  # PersonaGen graphs its backbone per window length itself

    # -- prompts ---------------------------------------------------------------------------

    def start_prompt(self, slot: int, plan: PromptPlan) -> None:
        self._runs[slot] = _PromptRun(plan)

    def end_prompt(self, slot: int) -> None:
        self._runs[slot] = None

    def prompting_rows(self) -> np.ndarray:
        return np.array([run is not None for run in self._runs], dtype=bool)

    def reset_slots(self, slots: list[int], seeds: list[int]) -> None:
        super().reset_slots(slots, seeds)
        for slot in slots:
            self._runs[slot] = None

    # -- the step --------------------------------------------------------------------------

    def _generate(
        self, user_codes: torch.Tensor, rows: np.ndarray, prompting: np.ndarray, outputs: list[SlotOutput]
    ) -> torch.Tensor:
        own = self.layout.model_codebooks
        channels = 1 + self.layout.n_q
        given_host = np.full((self.batch_size, channels), UNGENERATED, dtype=np.int64)
        embedding = embedding_rows = None
        for slot in np.flatnonzero(prompting):
            run = self._runs[slot]
            given_host[slot] = run.plan.given[run.index]
            saved = run.plan.embeddings
            if saved is not None and 1 <= run.index <= len(saved):
                if embedding is None:
                    embedding = torch.zeros(self.batch_size, 1, saved.shape[-1], device=self.device)
                    embedding_rows = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
                embedding[slot] = saved[run.index - 1].to(self.device)
                embedding_rows[slot] = True
        given = torch.from_numpy(given_host).to(self.device)
        caller = self._mask(rows)[:, None]
        given[:, 1 + own :] = torch.where(caller, user_codes[:, :, 0], given[:, 1 + own :])

        executing = rows | prompting
        self.generator.set_exec_mask(self._mask(executing))
        with self._sampling_noise(executing):
            tokens = self.generator.step(given, embedding, embedding_rows)
        for slot in np.flatnonzero(prompting):
            self._advance(slot)
        return tokens[:, : 1 + own]

    def _advance(self, slot: int) -> None:
        run = self._runs[slot]
        run.index += 1
        saved = run.plan.embeddings
        if saved is not None and run.index == 1 + len(saved):
            self.generator.load_slot_cache(slot, run.plan.cache_after)
        if run.index == run.plan.steps:
            self._runs[slot] = None  # the engine sees the slot stop prompting and tells the call

    def record_voice(self, name: str, slot: int = 0) -> PrecomputedVoice:
        """Replay a clip voice in `slot` and keep what PersonaPlex's `.pt` voices hold: the backbone's input
        embedding at each step after the first, and the token cache at the end. For tools, not during calls."""
        voice = self.prompt_book.voice(name)
        if voice.codes is None:
            raise ValueError(f"voice {name} is already precomputed")
        plan = self.prompt_book.plan(Persona(prompt="", voice=name))
        recorded: list[torch.Tensor] = []
        self.generator.embedding_tap = lambda embedded: recorded.append(embedded[slot].detach().cpu().clone())
        try:
            self.reset_slots([slot], [0])
            self.start_prompt(slot, PromptPlan(plan.given[: voice.steps]))
            idle = np.zeros(self.batch_size, dtype=bool)
            silence = np.zeros((self.batch_size, self.frame_size), dtype=np.float32)
            while self.prompting_rows()[slot]:
                self.step(silence, idle)
        finally:
            self.generator.embedding_tap = None
        cache = self.generator.slot_cache(slot).cpu()
        self.reset_slots([slot], [0])
        return PrecomputedVoice(embeddings=torch.stack(recorded), cache=cache)

    def warm_up(self, steps: int | None = None) -> None:
        """Warm up the conversation path, then one prompt step in every slot (the prompt's own path)."""
        super().warm_up(steps)
        plan = self.prompt_book.plan(None)
        for slot in range(self.batch_size):
            self.start_prompt(slot, PromptPlan(plan.given[:2]))
        silence = np.zeros((self.batch_size, self.frame_size), dtype=np.float32)
        none = np.zeros(self.batch_size, dtype=bool)
        while self.prompting_rows().any():
            self.step(silence, none)
        all_slots = list(range(self.batch_size))
        self.reset_slots(all_slots, all_slots)


# -- the prompt book: voices and the codes of silence and of the tone ---------------------------


def _encode(model: LoadedModel, audio: np.ndarray, codebooks: int) -> np.ndarray:
    """Mimi codes of a clip, [frames, codebooks]; the clip is padded to whole frames."""
    frame = model.mimi.frame_size
    padded = np.zeros(max(1, math.ceil(len(audio) / frame)) * frame, dtype=np.float32)
    padded[: len(audio)] = audio
    device = next(model.mimi.parameters()).device
    with torch.no_grad():
        codes = model.mimi.encode(torch.from_numpy(padded).to(device)[None, None])
    return codes[0, :codebooks].T.cpu().numpy().astype(np.int64)


def _steady_codes(model: LoadedModel, audio: np.ndarray, codebooks: int) -> np.ndarray:
    """The codes of a steady signal: a frame from its middle, away from the start's padding."""
    codes = _encode(model, audio, codebooks)
    return codes[len(codes) // 2]


def tone(sample_rate: int, seconds: float, hz: float = 440.0, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    return (level * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def synthetic_voices(sample_rate: int = 24000) -> dict[str, np.ndarray]:
    """Two 2 s vowel-like clips (harmonics with vibrato) so a test model has voices to choose from."""
    t = np.arange(2 * sample_rate) / sample_rate
    clips = {}
    for name, pitch in (("test-low", 110.0), ("test-high", 220.0)):
        phase = 2 * np.pi * np.cumsum(pitch * (1 + 0.03 * np.sin(2 * np.pi * 5 * t))) / sample_rate
        clip = sum(np.sin(k * phase) / k for k in range(1, 12))
        clips[name] = (0.1 * clip / np.abs(clip).max()).astype(np.float32)
    return clips


def build_prompt_book(model: LoadedModel, layout: ModelLayout, options: VoiceOptions) -> PromptBook:
    own = layout.model_codebooks
    rate = layout.sample_rate
    if layout.card == 2048 and own == len(PERSONAPLEX_SILENCE_CODES):
        silence, sine = np.array(PERSONAPLEX_SILENCE_CODES), np.array(PERSONAPLEX_SINE_CODES)
    else:  # another Mimi (the tiny test model): the same signals, encoded by this Mimi
        silence = _steady_codes(model, np.zeros(rate, dtype=np.float32), own)
        sine = _steady_codes(model, tone(rate, 1.0), own)

    voices: dict[str, Voice] = {}
    clips = dict(options.synthetic or {})
    for path in voice_files(options.folder) if options.folder else []:
        if path.stem in voices:
            raise ValueError(f"two voices are named {path.stem}: {voices[path.stem].source.name} and {path.name}")
        if path.suffix.lower() == PRECOMPUTED_EXTENSION:
            voices[path.stem] = Voice(path.stem, path, precomputed=_checked_precomputed(path, model, layout))
        else:
            clips[path.stem] = read_audio_file(str(path), rate)
            voices[path.stem] = Voice(path.stem, path)
    for name, audio in clips.items():
        seconds = len(audio) / rate
        if seconds > options.limits.max_voice_seconds:
            raise ValueError(f"voice {name} is {seconds:.1f} s long; voice clips may be at most "
                             f"{options.limits.max_voice_seconds:g} s (every frame is a model step)")
        source = voices[name].source if name in voices else Path(f"<built-in {name}>")
        voices[name] = Voice(name, source, codes=_encode(model, normalise_loudness(audio), own))

    default_voice = options.default_voice or (sorted(voices)[0] if voices else None)
    if default_voice is not None and default_voice not in voices:
        raise ValueError(f"default voice {default_voice!r} is not among the voices: {', '.join(sorted(voices))}")
    book = PromptBook(
        tokenizer=model.text_tokenizer,
        voices=voices,
        silence_codes=silence,
        sine_codes=sine,
        text_padding_id=model.lm.existing_text_padding_id,
        initial_audio_id=model.lm.initial_token_id,
        limits=options.limits,
        default_voice=default_voice,
    )
    if options.default_prompt is not None:
        book.default_prompt = options.default_prompt
    book.plan(None)  # the defaults must fit the limits too
    return book


def _checked_precomputed(path: Path, model: LoadedModel, layout: ModelLayout) -> PrecomputedVoice:
    voice = load_precomputed_voice(path)
    cache_shape = (1 + layout.n_q, layout.max_delay + 3)
    if voice.embeddings.shape[-1] != model.lm.dim or tuple(voice.cache.shape) != cache_shape:
        raise ValueError(
            f"{path.name} was made for another model: embeddings of width {voice.embeddings.shape[-1]} "
            f"and a cache of shape {tuple(voice.cache.shape)}; this model needs {model.lm.dim} and {cache_shape}"
        )
    cache = voice.cache
    if cache.min() < UNGENERATED or cache[1:].max() > layout.card or cache[0].max() > layout.text_card:
        raise ValueError(f"{path.name} holds token ids outside this model's vocabularies")
    return voice
