"""The order of block visits: T rounds x B blocks, each visit R local steps (+ gossip each)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_ORDERS = ("ascending", "descending", "random")


@dataclass(frozen=True)
class Visit:
    round: int
    block: int
    position: int  # index of the visit in the whole run


def build_schedule(num_blocks: int, rounds: int, order: str = "ascending", seed: int = 0) -> list[Visit]:
    """All visits of a run; "random" draws a fresh seeded permutation per round (same on every node)."""
    if order not in BLOCK_ORDERS:
        raise ValueError(f"block-order must be one of {BLOCK_ORDERS}, got '{order}'")
    rng = np.random.default_rng(seed)
    visits: list[Visit] = []
    for t in range(rounds):
        if order == "ascending":
            blocks = list(range(num_blocks))
        elif order == "descending":
            blocks = list(range(num_blocks - 1, -1, -1))
        else:
            blocks = [int(b) for b in rng.permutation(num_blocks)]
        visits += [Visit(t, b, len(visits) + i) for i, b in enumerate(blocks)]
    return visits
