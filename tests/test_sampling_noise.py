"""Per-slot sampling noise (server/model/sampling.py): each call's stream is its own, whoever is beside it."""

from __future__ import annotations

import numpy as np
import torch

from server.model.sampling import SlotNoise, mix32

WIDTHS = [25, 250, 250]


def draws(noise: SlotNoise, schedule: list[np.ndarray]) -> list[torch.Tensor]:
    """The whole noise of each step, one step per row mask in `schedule`."""
    taken = []
    for rows in schedule:
        noise._refill(rows)
        taken.append(torch.cat([noise.buffer(i).flatten(1) for i in range(len(noise.site_widths))], dim=1).clone())
    return taken


def test_a_slots_stream_depends_on_its_seed_and_its_own_steps_only():
    alone = SlotNoise(4, WIDTHS, torch.device("cpu"))
    alone.seed(0, 1234)
    mine = [step[0] for step in draws(alone, [np.array([True, False, False, False])] * 5)]

    busy = SlotNoise(4, WIDTHS, torch.device("cpu"))
    busy.seed(2, 1234)  # the same seed in another slot, beside neighbours with seeds of their own
    busy.seed(0, 99)
    busy.seed(1, 7)
    schedule = [np.array([True, True, s % 2 == 0, True]) for s in range(10)]  # slot 2 sits out odd steps
    taken = draws(busy, schedule)
    beside = [taken[s][2] for s in range(10) if s % 2 == 0]
    assert all(torch.equal(a, b) for a, b in zip(mine, beside, strict=True))

    other = SlotNoise(4, WIDTHS, torch.device("cpu"))
    other.seed(0, 1235)
    assert not torch.equal(draws(other, [np.array([True, False, False, False])])[0][0], mine[0])
    assert not torch.equal(mine[0], mine[1])  # a new step, new noise
    # Re-seeding starts the stream afresh; 64-bit seeds count their high half too.
    alone.seed(0, 1234)
    assert torch.equal(draws(alone, [np.array([True, False, False, False])])[0][0], mine[0])
    alone.seed(0, 1234 + (1 << 40))
    assert not torch.equal(draws(alone, [np.array([True, False, False, False])])[0][0], mine[0])


def test_the_noise_is_exponential_and_the_hash_spreads_its_bits():
    noise = SlotNoise(64, [2025], torch.device("cpu"))
    values = torch.cat(draws(noise, [np.ones(64, dtype=bool)] * 4)).flatten()
    assert values.numel() == 4 * 64 * 2025 and bool((values > 0).all())
    assert abs(float(values.mean()) - 1) < 0.01 and abs(float(values.var()) - 1) < 0.03  # Exp(1): mean 1, var 1
    assert abs(float((values > 1).float().mean()) - np.exp(-1)) < 0.005  # P(X > 1) = 1/e
    # Neighbouring inputs give unrelated outputs: about half the bits flip.
    x = torch.arange(1 << 12)
    flips = (mix32(x) ^ mix32(x + 1)).tolist()
    assert 15 < np.mean([bin(f).count("1") for f in flips]) < 17
