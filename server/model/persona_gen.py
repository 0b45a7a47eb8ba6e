"""The generation step for PersonaPlex-style checkpoints (`n_q == dep_q`), batched over call slots.

In such a model the depth transformer predicts all `dep_q` codebooks of a
frame: the first half are the model's own audio, the second half the
caller's. Stock `LMGen` cannot run it: it reads `n_q - dep_q = 0` codebooks
from the caller (the caller is silently dropped) and samples every depth
step freely. This module does what the model was trained for:

- Every token is stored at `frame + delay` in a short ring cache, as in moshi.
  Tokens the step is given ("provided") are written there and flagged.
- The backbone runs one frame behind the newest input (on position
  `offset - 1`) so that the caller's codebooks of the frame being predicted
  are all known (codebook 0 has delay 0, the rest delay 1).
- The depth transformer then runs all `dep_q` steps; after each one whose
  target was provided (the caller's codebooks, or anything a prompt forces),
  the next step is fed the provided token, not the sample. Samples are stored
  only where nothing was provided.
- Output: `[B, 1 + dep_q]` tokens for the frame `max_delay` frames back.
  Channel 0 is text, 1..dep_q/2 the model's audio; the caller's half is
  returned too, and the stepper must not decode it.

Each slot keeps its own offset, so slots may start, prompt and end at any
time; `set_exec_mask` chooses the slots a step touches, `reset_streaming`
clears slots. An optional per-row embedding override lets a slot replay a
precomputed prompt (PersonaPlex's `.pt` voices hold embeddings, not tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch
from moshi.models.lm import LMModel
from moshi.modules.streaming import State, StreamingModule
from moshi.utils.compile import CUDAGraphed

from . import moshi_compat, sampling
from .kv_compat import GraphsByWindow, KvWindow

UNGENERATED = -2


@dataclass
class _PersonaGenState(State):
    cache: torch.Tensor  # [B, K, CT] token ids, K = 1 + n_q
    provided: torch.Tensor  # [B, K, CT] bool: this token was given, not sampled
    initial: torch.Tensor  # [1, K, 1] moshi's start-of-sequence tokens
    offsets: torch.Tensor  # [B] frames seen per slot
    offsets_host: np.ndarray  # the same, on the host, to decide which rows run
    graphed_backbone: CUDAGraphed | GraphsByWindow
    graphed_depth: CUDAGraphed
    no_embedding: torch.Tensor  # [B, 1, dim] zeros and an all-False row mask: steps that replace nothing
    no_embedding_rows: torch.Tensor
    exit_stack: ExitStack | None = None
    lm_reset: Callable[[torch.Tensor], None] | None = None

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        rows = reset_mask[:, None, None]
        self.cache[:] = torch.where(rows, torch.full_like(self.cache, UNGENERATED), self.cache)
        self.provided[:] = self.provided & ~rows
        self.offsets[:] = torch.where(reset_mask, torch.zeros_like(self.offsets), self.offsets)
        self.offsets_host[reset_mask.cpu().numpy()] = 0
        self.lm_reset(reset_mask)

    def __enter__(self):
        self.exit_stack.__enter__()

    def __exit__(self, exc_type, exc_value, traceback):
        self.exit_stack.__exit__(exc_type, exc_value, traceback)


class PersonaGen(StreamingModule[_PersonaGenState]):
    """Batched, forcing generation step for an LMModel whose depth transformer also predicts the caller."""

    def __init__(
        self,
        lm: LMModel,
        use_sampling: bool = True,
        temp: float = 0.8,
        temp_text: float = 0.7,
        top_k: int = 250,
        top_k_text: int = 25,
        window: KvWindow | None = None,
        graph_by_window: bool = False,
    ):
        assert not lm.training, "generation runs in eval mode"
        if lm.n_q != lm.dep_q or lm.dep_q % 2:
            raise ValueError(f"PersonaGen needs n_q == dep_q and an even dep_q, got n_q={lm.n_q} dep_q={lm.dep_q}")
        if lm.fuser is not None or lm.condition_provider is not None:
            raise ValueError("PersonaGen does not feed conditioning tensors; this checkpoint has conditioners")
        super().__init__()
        self.lm = lm
        self.lm.set_streaming_detached(True)
        self.use_sampling = use_sampling
        self.temp, self.temp_text = temp, temp_text
        self.top_k, self.top_k_text = top_k, top_k_text
        self.delays = torch.tensor(lm.delays, device=lm.device, dtype=torch.long)
        self.max_delay = max(lm.delays)
        # Two more than the largest delay: the backbone reads one frame behind the newest write.
        self.cache_length = self.max_delay + 3
        # The host's count of the backbone's filled KV entries; a windowed one reads only those.
        self.window = window
        self.graph_by_window = graph_by_window and window is not None
        # Set to record backbone input embeddings (eager steps only): how precomputed voices are made.
        self.embedding_tap: Callable[[torch.Tensor], None] | None = None
        # Set to see each step's text logits [B, 1, 1, text_card] and the model's own choices [B, K] before a
        # provided token replaces them (benchmarks compare KV cache storages this way).
        self.step_tap: Callable[[torch.Tensor, torch.Tensor], None] | None = None

    @property
    def num_channels(self) -> int:
        return self.lm.num_codebooks

    def _init_streaming_state(self, batch_size: int) -> _PersonaGenState:
        lm = self.lm
        shape = (batch_size, lm.num_codebooks, self.cache_length)
        on_cuda = lm.device.type == "cuda"
        state = _PersonaGenState(
            batch_size,
            lm.device,
            cache=torch.full(shape, UNGENERATED, device=lm.device, dtype=torch.long),
            provided=torch.zeros(shape, device=lm.device, dtype=torch.bool),
            initial=moshi_compat.initial_token(lm),
            offsets=torch.zeros(batch_size, device=lm.device, dtype=torch.long),
            offsets_host=np.zeros(batch_size, dtype=np.int64),
            graphed_backbone=(GraphsByWindow(self._backbone, self.window, disable=not on_cuda)
                              if self.graph_by_window
                              else CUDAGraphed(self._backbone, disable=not on_cuda)),
            graphed_depth=CUDAGraphed(self._depth, disable=not on_cuda),
            no_embedding=torch.zeros(batch_size, 1, lm.dim, device=lm.device, dtype=lm.dtype),
            no_embedding_rows=torch.zeros(batch_size, dtype=torch.bool, device=lm.device),
            exit_stack=ExitStack(),
        )
        state.exit_stack.enter_context(lm.streaming(batch_size))
        state.lm_reset = lm.reset_streaming
        return state

    # -- the two networks ------------------------------------------------------------------

    def _backbone(
        self, tokens: torch.Tensor, override: torch.Tensor, override_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed `tokens` [B, K, 1] (or take a row's `override` embedding) and run the temporal transformer."""
        lm = self.lm
        embedded = lm.text_emb(tokens[:, 0])
        for q in range(lm.n_q):
            embedded = embedded + lm.emb[q](tokens[:, q + 1])
        embedded = torch.where(override_rows[:, None, None], override.to(embedded), embedded)
        if self.embedding_tap is not None:
            self.embedding_tap(embedded)
        out = lm.transformer(embedded)
        if lm.out_norm:
            out = lm.out_norm(out)
        return out, lm.text_linear(out)[:, None]

    def _depth(
        self, text: torch.Tensor, backbone_out: torch.Tensor, targets: torch.Tensor, target_given: torch.Tensor
    ) -> torch.Tensor:
        """All dep_q depth steps; a provided target replaces the sample as the next step's input."""
        lm = self.lm
        batch = text.shape[0]
        previous = text
        samples = []
        with lm.depformer.streaming(batch):
            for q in range(lm.dep_q):
                logits = lm.forward_depformer(q, previous[:, None, None], backbone_out)
                sample = sampling.sample_token(logits.float(), self.use_sampling, self.temp, self.top_k)[:, 0, 0]
                samples.append(sample)
                previous = torch.where(target_given[:, q], targets[:, q], sample)
        return torch.stack(samples, dim=1)

    # -- one step --------------------------------------------------------------------------

    @torch.no_grad()
    def step(
        self,
        given: torch.Tensor,
        embedding: torch.Tensor | None = None,
        embedding_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Advance the executing slots by one frame.

        `given` [B, K]: for each channel, the token of this frame, or -2 to let the model generate it
        (the caller's codebooks are always given; a prompt also gives text and the model's audio).
        `embedding` [B, 1, dim] with `embedding_rows` [B]: rows whose backbone input is that embedding.
        Returns [B, K] tokens for the frame `max_delay` back; -2 where a row has none yet or did not run.
        """
        state = self._streaming_state
        if state is None:
            raise RuntimeError("PersonaGen.step needs streaming mode")
        batch, channels, length = state.cache.shape
        if given.shape != (batch, channels):
            raise ValueError(f"given tokens have shape {tuple(given.shape)}, expected {(batch, channels)}")
        executing = state.exec_mask
        offsets = state.offsets
        rows = torch.arange(batch, device=given.device)[:, None]
        chans = torch.arange(channels, device=given.device)[None, :]

        # 1. Store what this frame provides, at frame + delay.
        write = (offsets[:, None] + self.delays[None, :]) % length  # [B, K]
        give = executing[:, None] & (given >= 0)
        state.cache[rows, chans, write] = torch.where(
            give, given, state.cache[rows, chans, write]
        )
        state.provided[rows, chans, write] |= give
        # Positions before a channel's first frame hold the start-of-sequence token.
        here = (offsets % length)[:, None].expand(-1, channels)
        starting = executing[:, None] & (offsets[:, None] <= self.delays[None, :])
        initial = state.initial[0, :, 0][None, :].expand(batch, -1)
        current = state.cache[rows, chans, here]
        state.cache[rows, chans, here] = torch.where(starting, initial, current)
        state.provided[rows, chans, here] |= starting

        # 2. Rows at their first frame have nothing to predict from yet.
        executing_host = executing.cpu().numpy()  # one host copy of the mask per step
        running_host = executing_host & (state.offsets_host > 0)
        out = torch.full((batch, channels), UNGENERATED, device=given.device, dtype=torch.long)
        if running_host.any():
            if self.window is not None:
                self.window.begin(running_host)
            out = self._predict(state, torch.from_numpy(running_host).to(given.device), embedding, embedding_rows)
            if self.window is not None:
                self.window.end(running_host)
        state.offsets[:] = torch.where(executing, offsets + 1, offsets)
        state.offsets_host[executing_host] += 1
        return out

    def _predict(
        self,
        state: _PersonaGenState,
        running: torch.Tensor,
        embedding: torch.Tensor | None,
        embedding_rows: torch.Tensor | None,
    ) -> torch.Tensor:
        lm = self.lm
        batch, channels, length = state.cache.shape
        offsets = state.offsets
        source = ((offsets - 1) % length)[:, None, None].expand(-1, channels, 1)
        target = (offsets % length)[:, None, None].expand(-1, channels, 1)
        tokens = state.cache.gather(2, source)
        tokens = torch.where(running[:, None, None], tokens, state.initial)  # idle rows get valid ids
        if embedding is None:
            embedding, embedding_rows = state.no_embedding, state.no_embedding_rows
        lm.set_exec_mask(running)
        backbone = self._backbone if self.embedding_tap is not None else state.graphed_backbone
        backbone_out, text_logits = backbone(tokens, embedding.to(lm.device), embedding_rows & running)

        targets = state.cache.gather(2, target)[:, :, 0]
        target_given = state.provided.gather(2, target)[:, :, 0]
        text_sample = sampling.sample_token(text_logits.float(), self.use_sampling, self.temp_text, self.top_k_text)
        text_sample = text_sample[:, 0, 0]
        text = torch.where(target_given[:, 0], targets[:, 0], text_sample)
        audio = state.graphed_depth(text, backbone_out, targets[:, 1:], target_given[:, 1:])

        # Store samples where nothing was provided; the source position is used up.
        sampled = torch.cat([text_sample[:, None], audio], dim=1)
        if self.step_tap is not None:
            self.step_tap(text_logits, sampled)
        keep = target_given | ~running[:, None]
        state.cache.scatter_(2, target, torch.where(keep, targets, sampled)[:, :, None])
        state.provided.scatter_(2, source, (state.provided.gather(2, source) & ~running[:, None, None]))

        ready = running & (offsets > self.max_delay)
        frame = ((offsets[:, None] - self.max_delay + self.delays[None, :]) % length)[:, :, None]
        result = state.cache.gather(2, frame)[:, :, 0]
        return torch.where(ready[:, None], result, torch.full_like(result, UNGENERATED))

    def slot_cache(self, slot: int) -> torch.Tensor:
        return self._streaming_state.cache[slot].clone()

    def load_slot_cache(self, slot: int, cache: torch.Tensor) -> None:
        """Replace one slot's token cache, as a precomputed voice prompt does after its embeddings."""
        state = self._streaming_state
        if cache.shape != state.cache.shape[1:]:
            needed = tuple(state.cache.shape[1:])
            raise ValueError(f"prompt cache has shape {tuple(cache.shape)}, this model needs {needed}")
        state.cache[slot] = cache.to(state.cache)
