"""One batched step of Moshi: ONE Mimi encodes, LMGen steps, the SAME Mimi decodes.

B call slots share one `MimiModel` and one `LMGen`, both streaming at batch B
for the life of the process (`streaming_forever`). Per step:

1. Mimi encodes the frames of the slots that have one (exec mask = those
   slots; the others' streaming state is untouched).
2. A slot's first frame is shaped by left padding: its codes are dropped and
   that slot's encoder state is reset, as moshi's own server does.
3. The caller's codebooks are checked against the audio card, then LMGen
   steps the slots that have a frame past their first.
4. The output is routed by `server.model.tokens`: channel 0 is text, channels
   1..model_codebooks are the model's audio; rows not generated yet are skipped.
5. The same Mimi decodes the audio codebooks of the rows that have them.

`PersonaStepper` (server.model.persona_step) keeps this step and swaps the
generator for PersonaPlex-style checkpoints and their prompts.

Everything here runs on the engine's inference thread.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, fields

import numpy as np
import torch
from moshi.models.lm import LMGen
from moshi.modules.streaming import StreamingModule
from moshi.run_inference import get_condition_tensors

from . import kv_compat, sampling
from .check import ModelMismatch, check_layout, read_layout
from .source import LoadedModel
from .stepper import ModelInfo, NoPrompts, SlotOutput
from .tokens import TextPieces, check_codes, route_step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    """LMGen's sampling knobs; None keeps the checkpoint's lm_gen_config value, else moshi's default."""

    use_sampling: bool | None = None
    temp: float | None = None
    temp_text: float | None = None
    top_k: int | None = None
    top_k_text: int | None = None

    def lm_gen_kwargs(self, checkpoint_defaults: dict) -> dict:
        merged = {k: v for k, v in checkpoint_defaults.items() if k in {f.name for f in fields(self)}}
        merged.update({f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None})
        return merged


GREEDY = SamplingConfig(use_sampling=False)


def _outermost_streaming(module: torch.nn.Module) -> list[StreamingModule]:
    """The streaming modules at or below `module` that own their children's streaming state."""
    if isinstance(module, StreamingModule):
        return [module]
    return [found for child in module.children() for found in _outermost_streaming(child)]


class MoshiStepper(NoPrompts):
    """B call slots on one Mimi and one LMGen. Build and use it on the inference thread only."""

    runs_persona_layout = False

    def __init__(
        self,
        model: LoadedModel,
        batch_size: int,
        sampling_config: SamplingConfig = SamplingConfig(),  # noqa: B008 - frozen dataclass
        sample_rate: int = 24000,
        frame_size: int | None = None,
        kv: kv_compat.KvOptions = kv_compat.KvOptions(),  # noqa: B008 - frozen dataclass
    ):
        self.layout = read_layout(model.mimi, model.lm, model.text_tokenizer)
        log.info("model %s: %s", model.name, self.layout.describe())
        check_layout(self.layout, sample_rate=sample_rate, frame_size=frame_size)
        if self.layout.takes_persona and not self.runs_persona_layout:
            raise ModelMismatch(
                f"n_q == dep_q == {self.layout.dep_q}: the depth transformer predicts the caller's codebooks "
                "(a PersonaPlex layout), so stock LMGen would silently ignore the caller; run it with PersonaStepper"
            )
        if model.is_test_model:
            log.warning("%s", model.notice)

        self.batch_size = batch_size
        self.frame_size = self.layout.frame_size
        self.sample_rate = self.layout.sample_rate
        self.device = model.lm.device
        self.mimi = model.mimi
        self.info = ModelInfo(
            name=model.name,
            is_test_model=model.is_test_model,
            kind=self.layout.kind,
            notice=model.notice,
            layout=self.layout.describe(),
        )
        lm = self.lm = model.lm
        self.kv = kv
        self.kv_window = kv_compat.KvWindow(batch_size, kv_compat.main_capacity(lm), enabled=kv.attention != "ring")
        gen_kwargs = sampling_config.lm_gen_kwargs(model.lm_gen_config)
        self.generator = self._make_generator(model, gen_kwargs)
        self.noise: sampling.SlotNoise | None = None
        if self.generator.use_sampling:
            sampling.install()
            widths = sampling.sampling_site_widths(
                lm.text_card, lm.card, lm.dep_q, self.generator.top_k_text, self.generator.top_k
            )
            self.noise = sampling.SlotNoise(batch_size, widths, self.device)
        self.text = TextPieces(
            model.text_tokenizer, (lm.existing_text_end_padding_id, lm.existing_text_padding_id)
        )
        self._encoder_side = [
            streaming
            for module in (self.mimi.encoder, self.mimi.encoder_transformer, getattr(self.mimi, "downsample", None))
            if module is not None
            for streaming in _outermost_streaming(module)
        ]
        self._frames_seen = np.zeros(batch_size, dtype=np.int64)
        # Streaming at batch B for the stepper's life; close() hands the model back. If entering fails
        # (out of device memory for the KV caches), the model is handed back at once, still usable.
        self._streaming = contextlib.ExitStack()
        try:
            self._streaming.enter_context(self.mimi.streaming(batch_size))
            if kv == kv_compat.KvOptions():
                self._streaming.enter_context(self.generator.streaming(batch_size))  # moshi's own caches
            else:
                log.info("%s", kv.describe())
                with kv_compat.building_caches(self.kv_window, kv.storage):
                    self._streaming.enter_context(self.generator.streaming(batch_size))
                self._graph_by_window()
                if kv.fused:
                    self._streaming.callback(kv_compat.fuse_attention(lm))
        except BaseException:
            self._streaming.close()
            raise

    def _make_generator(self, model: LoadedModel, gen_kwargs: dict) -> LMGen:
        return LMGen(
            model.lm,
            support_out_of_sync=True,  # without it, resetting one slot silences every slot for a step
            condition_tensors=get_condition_tensors(
                model.model_type, model.lm, batch_size=self.batch_size, cfg_coef=1.0
            ),
            **gen_kwargs,
        )

    def _graph_by_window(self) -> None:
        if self.kv.window:
            kv_compat.graph_main_by_window(self.generator, self.kv_window)

    def close(self) -> None:
        """Leave streaming mode, so the same model objects can be used again (benchmarks, tests)."""
        self._streaming.close()

    def _mask(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(rows, dtype=bool)).to(self.device)

    @torch.no_grad()
    def reset_slots(self, slots: list[int], seeds: list[int]) -> None:
        """A new call in these slots: clear their Mimi and LM state, and reseed their sampling."""
        rows = np.zeros(self.batch_size, dtype=bool)
        rows[slots] = True
        mask = self._mask(rows)
        self.mimi.reset_streaming(mask)
        self.generator.reset_streaming(mask)
        self.kv_window.reset(rows)
        if self.kv.bench_age:
            kv_compat.age_slots(self.lm, self.kv_window, self.kv.bench_age, rows)
        self._frames_seen[rows] = 0
        if self.noise is not None:
            for slot, seed in zip(slots, seeds, strict=True):
                self.noise.seed(slot, seed)

    def _reset_encoder(self, rows: np.ndarray) -> None:
        mask = self._mask(rows)
        for module in self._encoder_side:
            module.reset_streaming(mask)

    def _encode(self, frames: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        audio = torch.from_numpy(frames).to(self.device)[:, None, :]
        self.mimi.set_exec_mask(self._mask(rows))
        return self.mimi.encode(audio)

    def _sampling_noise(self, rows: np.ndarray) -> contextlib.AbstractContextManager:
        return self.noise.step(rows) if self.noise is not None else contextlib.nullcontext()

    def _generate(
        self, user_codes: torch.Tensor, rows: np.ndarray, prompt_rows: np.ndarray, outputs: list[SlotOutput]
    ) -> torch.Tensor:
        """One LM step for `rows` and `prompt_rows`; returns `[B, 1 + model_codebooks]` tokens."""
        self.generator.set_exec_mask(self._mask(rows))
        self.kv_window.begin(rows)
        with self._sampling_noise(rows):
            tokens = self.generator.step(user_codes)
        self.kv_window.end(rows)
        if tokens is None:
            raise RuntimeError("LMGen returned no tokens although it supports out-of-sync slots")
        return tokens[:, :, 0]

    def _decode(self, audio_codes: torch.Tensor, rows: np.ndarray) -> np.ndarray:
        self.mimi.set_exec_mask(self._mask(rows))
        pcm = self.mimi.decode(audio_codes)
        return pcm[:, 0].float().cpu().numpy()

    @torch.no_grad()
    def step(self, frames: np.ndarray, rows: np.ndarray, prompts: np.ndarray | None = None) -> list[SlotOutput]:
        rows = np.asarray(rows, dtype=bool).copy()
        prompt_rows = self.prompting_rows() if prompts is None else self.prompting_rows() & prompts
        outputs = [SlotOutput() for _ in range(self.batch_size)]
        lm_rows = np.zeros_like(rows)
        if not rows.any():  # a step only for slots replaying a prompt: no caller audio to encode
            user_codes = torch.zeros(self.batch_size, self.layout.user_codebooks, 1, dtype=torch.long,
                                     device=self.device)
        else:
            codes = self._encode(frames, rows)
            first = rows & (self._frames_seen == 0)
            self._frames_seen[rows] += 1
            if first.any():
                self._reset_encoder(first)
            lm_rows = rows & ~first
            user_codes = codes[:, : self.layout.user_codebooks]
            # Checked on the host before the LM embeds them: on CUDA an out-of-range id is a device-side
            # assert that kills the process, so this one small copy per step is worth its sync.
            for slot, error in check_codes(
                user_codes[:, :, 0].cpu().numpy(), lm_rows, self.layout.card, "Mimi encoder output"
            ).items():
                outputs[slot].error = error
                lm_rows[slot] = False
            # Rows that do not execute get a valid filler id.
            user_codes = torch.where(self._mask(lm_rows)[:, None, None], user_codes, torch.zeros_like(user_codes))
        if not (lm_rows.any() or prompt_rows.any()):
            return outputs

        tokens = self._generate(user_codes, lm_rows, prompt_rows, outputs)
        own = self.layout.model_codebooks
        routed = route_step(
            tokens.cpu().numpy(), lm_rows, text_card=self.layout.text_card, card=self.layout.card, dep_q=own
        )
        decode_rows = np.array([row.decode_audio for row in routed], dtype=bool)
        for slot in np.flatnonzero(lm_rows):
            outputs[slot].error = routed[slot].error
            outputs[slot].text = self.text.piece(routed[slot].text_id)
        if decode_rows.any():
            audio_codes = tokens[:, 1 : 1 + own, None]  # channel 0 is text, and the caller's codebooks
            audio_codes = torch.where(  # (PersonaPlex) come after the model's: neither is ever decoded
                self._mask(decode_rows)[:, None, None], audio_codes, torch.zeros_like(audio_codes)
            )
            pcm = self._decode(audio_codes, decode_rows)
            for slot in np.flatnonzero(decode_rows):
                outputs[slot].audio = pcm[slot].copy()
        return outputs

    def warm_up(self, steps: int | None = None) -> None:
        """Run full-batch steps (which also captures the CUDA graphs), then clear every slot."""
        steps = steps if steps is not None else 4 + self.layout.max_delay
        log.info("warming up: %d steps of all %d slots on %s (%s)", steps, self.batch_size, self.device,
                 "the first captures CUDA graphs and compiles kernels" if self.device.type == "cuda"
                 else "no torch.compile on a CPU")
        rows = np.ones(self.batch_size, dtype=bool)
        all_slots = list(range(self.batch_size))
        self.reset_slots(all_slots, all_slots)
        silence = np.zeros((self.batch_size, self.frame_size), dtype=np.float32)
        for _ in range(steps):
            self.step(silence, rows)
        # A windowed cache reads a different length per bucket, and each length is its own CUDA graph:
        # two steps at each (the first runs eagerly, the second captures) so no call waits for a capture.
        for length in self.kv_window.buckets[1:] if self.kv.window else []:
            with self.kv_window.at_least(length):
                for _ in range(2):
                    self.step(silence, rows)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.reset_slots(all_slots, all_slots)
