"""Reading an LM step's output: which rows are real, which channel is what.

`LMGen.step` returns `[B, 1 + dep_q, 1]`: channel 0 is the text token, channels
1..dep_q are the model's audio codebooks, and only those go to Mimi's decoder.
Negative ids are markers, never tokens: -2 "not generated yet" (a slot in its
first steps, or masked out of the step), -1 "zero token". Rows and channels
holding markers are skipped, never clamped. Any other id outside the
vocabulary is a bug upstream: it raises `TokenRangeError` naming the slot and
the channel, and the row is not decoded. Clamping it would turn the bug into
plausible noise, which is how earlier teams hid theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sentencepiece

UNGENERATED = -2
ZERO_TOKEN = -1
TEXT_CHANNEL = 0


class TokenRangeError(ValueError):
    """An id outside its vocabulary reached the engine. Always a bug; never clamped."""

    def __init__(self, slot: int, channel: int, token: int, limit: int, where: str):
        self.slot, self.channel, self.token, self.limit = slot, channel, token, limit
        super().__init__(
            f"{where}: slot {slot} channel {channel} has id {token}, outside [0, {limit}); "
            "refusing to feed it to an embedding or the decoder"
        )


def check_codes(codes: np.ndarray, rows: np.ndarray, card: int, where: str) -> dict[int, TokenRangeError]:
    """Errors for rows of `codes` ([B, K]) that execute and hold an id outside [0, card)."""
    errors: dict[int, TokenRangeError] = {}
    for slot in np.flatnonzero(rows):
        bad = np.flatnonzero((codes[slot] < 0) | (codes[slot] >= card))
        if bad.size:
            channel = int(bad[0])
            errors[int(slot)] = TokenRangeError(int(slot), channel, int(codes[slot, channel]), card, where)
    return errors


@dataclass
class RoutedRow:
    """One slot's share of an LM step: a text id (or None) and whether its audio can be decoded."""

    text_id: int | None = None
    decode_audio: bool = False
    error: TokenRangeError | None = None


def route_step(tokens: np.ndarray, rows: np.ndarray, *, text_card: int, card: int, dep_q: int) -> list[RoutedRow]:
    """Split an LM step output `[B, 1 + dep_q]` per slot; rows not in `rows` are skipped."""
    if tokens.ndim != 2 or tokens.shape[1] != 1 + dep_q:
        raise ValueError(f"LM step output has shape {tokens.shape}, expected [B, {1 + dep_q}]")
    routed = [RoutedRow() for _ in range(tokens.shape[0])]
    for slot in np.flatnonzero(rows):
        row = tokens[slot]
        row_out = routed[slot]
        limits = [text_card] + [card] * dep_q
        for channel, (token, limit) in enumerate(zip(row.tolist(), limits, strict=True)):
            if token in (UNGENERATED, ZERO_TOKEN):
                continue
            if token < 0 or token >= limit:
                where = "LM text output" if channel == TEXT_CHANNEL else "LM audio output"
                row_out.error = TokenRangeError(int(slot), channel, token, limit, where)
                break
        if row_out.error is not None:
            continue
        text = int(row[TEXT_CHANNEL])
        row_out.text_id = text if text >= 0 else None
        row_out.decode_audio = bool((row[1 : 1 + dep_q] >= 0).all())
    return routed


class TextPieces:
    """Turns text ids into the words a person reads; padding and control ids (<s>, </s>) give nothing."""

    def __init__(self, tokenizer: sentencepiece.SentencePieceProcessor, padding_ids: tuple[int, ...] = (0, 3)):
        self.tokenizer = tokenizer
        self.padding_ids = frozenset(padding_ids)

    def piece(self, text_id: int | None) -> str | None:
        if text_id is None or text_id in self.padding_ids or self.tokenizer.is_control(text_id):
            return None
        return self.tokenizer.id_to_piece(text_id).replace("\u2581", " ")
