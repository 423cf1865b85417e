"""Shared fixtures: a tiny random Llama on the real BBC News split, small enough for seconds-long runs,
on an irregular graph: 4 nodes, edges 0-3, 1-2, 1-3, 2-3 (degrees 1, 2, 2, 3), so the nodes mix
with different weights (W[0, 3] = 1/4, W[1, 2] = 1/3, self weights 3/4, 5/12, 5/12, 1/4) and a
swapped neighbour, weight or partition id changes the numbers."""

from __future__ import annotations

import pytest

from deca_flower.config import DecaConfig


@pytest.fixture
def tiny_cfg(tmp_path) -> DecaConfig:
    return DecaConfig(
        model="tiny-random", num_nodes=4, topology="erdos_renyi", edge_prob=0.6, layers_per_block=2,
        steps_per_block=2, rounds=1, batch_size=2, max_text_tokens=16, eval_samples=20, eval_batch_size=10,
        lr=1e-3, eval_every_blocks=0, results_dir=str(tmp_path / "runs"), run_name="t",
        state_dir=str(tmp_path / "nodes"), node_wait_s=5,
        # in-process grids answer during the push, so a reply that is missing afterwards never comes
        reply_timeout_s=1.0, rejoin_probe_s=0.5,
    )
