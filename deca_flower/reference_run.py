"""The single-process reference job: same config, same nodes, same math as the Flower run."""

from __future__ import annotations

import logging
import time
from typing import Any

from deca_flower.config import DecaConfig
from deca_flower.core.reference import run_reference
from deca_flower.core.schedule import build_schedule
from deca_flower.core.topology import build_graph, metropolis_hastings
from deca_flower.results import mean_std
from deca_flower.runtime import NodeRuntime, build_runtime

log = logging.getLogger(__name__)


def build_nodes(cfg: DecaConfig) -> list[NodeRuntime]:
    return [build_runtime(cfg, pid) for pid in range(cfg.num_nodes)]


def run_reference_job(cfg: DecaConfig, *, fast: bool = False, runtimes: list[NodeRuntime] | None = None) -> dict[str, Any]:
    """Train every node in this process and return final per-node and mean metrics."""
    runtimes = runtimes or build_nodes(cfg)
    weights = metropolis_hastings(build_graph(cfg.topology, cfg.num_nodes, seed=cfg.seed, edge_prob=cfg.edge_prob))
    schedule = build_schedule(len(runtimes[0].blocks), cfg.rounds, cfg.block_order, cfg.seed)
    start = time.time()
    losses: list[float] = []
    steps = runtimes[0].steps_per_visit
    run_reference([r.node for r in runtimes], weights, schedule, steps, fast=fast,
                  on_step=lambda visit, step, node_losses: losses.append(sum(node_losses) / len(node_losses)),
                  after_visit=lambda v: log.info("visit %d/%d block %d: loss %.4f", v.position + 1, len(schedule),
                                                 v.block, losses[-1]))
    train_s = time.time() - start
    per_node = [r.evaluate() for r in runtimes]
    scores = {}
    for key in cfg.headline:
        scores[f"{key}_mean"], scores[f"{key}_std"] = mean_std([m[key] for m in per_node])
    return {**scores, "per_node": per_node, "train_s": train_s, "inner_steps": len(schedule) * steps,
            "loss_per_step": losses}
