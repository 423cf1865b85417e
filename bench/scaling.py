"""Scaling: time per inner step and bytes as nodes go 4 -> 8 -> 16 and blocks change (k = 1, 2, 4).

    python bench/scaling.py [--model smollm2-135m-instruct] [--steps 2]

All nodes run in this one process (the reference's fast path), so "compute per node-step" is the
per-node cost a real deployment pays in parallel, and "mix" is the gossip arithmetic for all
nodes; bytes per exchange and per run come from `deca-flower plan` (exact: see wire_bytes.py).
Writes bench/scaling.png.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from deca_flower.config import DecaConfig
from deca_flower.core.reference import mix_fast
from deca_flower.core.topology import build_graph, metropolis_hastings
from deca_flower.plan import make_plan, meta_model
from deca_flower.results import plt
from deca_flower.runtime import build_runtime


def measure(cfg: DecaConfig, steps: int) -> dict:
    runtimes = [build_runtime(cfg, pid) for pid in range(cfg.num_nodes)]
    weights = metropolis_hastings(build_graph(cfg.topology, cfg.num_nodes, seed=cfg.seed, edge_prob=cfg.edge_prob))
    block = len(runtimes[0].blocks) - 1  # the top block: the typical layer block
    for r in runtimes:
        r.node.start_block(block)
    compute, mixing = [], []
    for _ in range(steps):
        start = time.perf_counter()
        halves = [r.node.local_step()[1] for r in runtimes]
        compute.append((time.perf_counter() - start) / cfg.num_nodes)
        start = time.perf_counter()
        mix_fast([r.node for r in runtimes], weights, halves)
        mixing.append(time.perf_counter() - start)
    plan = make_plan(cfg, model=meta_model(cfg.model))
    return {"nodes": cfg.num_nodes, "k": cfg.layers_per_block, "blocks": plan.num_blocks,
            "node_step_s": float(np.median(compute)), "mix_all_s": float(np.median(mixing)),
            "bytes_per_exchange": plan.bytes_per_exchange_mean, "bytes_per_node_run": plan.bytes_per_node_run,
            "messages": plan.train_messages}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DecaConfig.model)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"CUDA {torch.cuda.is_available()}")
    base = DecaConfig(model=args.model, topology="erdos_renyi", eval_samples=8, max_text_tokens=64, batch_size=4)
    configs = [base.replace(num_nodes=n, layers_per_block=2) for n in (4, 8, 16)]
    configs += [base.replace(num_nodes=4, layers_per_block=k) for k in (1, 4)]
    rows = [measure(cfg, args.steps) for cfg in configs]
    print("| nodes | k | blocks | compute per node-step s (top block) | mixing, all nodes s | MiB per exchange per node "
          "| GiB per node per run (T=1, R=8) | train messages per run |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['nodes']} | {r['k']} | {r['blocks']} | {r['node_step_s']:.2f} | {r['mix_all_s']:.3f} "
              f"| {r['bytes_per_exchange'] / 2**20:.1f} | {r['bytes_per_node_run'] / 2**30:.2f} | {r['messages']} |")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    by_nodes = [r for r in rows if r["k"] == 2]
    ax1.plot([r["nodes"] for r in by_nodes], [r["node_step_s"] + r["mix_all_s"] / r["nodes"] for r in by_nodes], "o-")
    ax1.set_xlabel("nodes (k=2)")
    ax1.set_ylabel("s per inner step per node")
    by_k = sorted((r for r in rows if r["nodes"] == 4), key=lambda r: r["k"])
    ax2.plot([r["k"] for r in by_k], [r["bytes_per_exchange"] / 2**20 for r in by_k], "o-")
    ax2.set_xlabel("layers per block k (4 nodes)")
    ax2.set_ylabel("MiB per exchange per node")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(__file__).with_name("scaling.png"), dpi=120)
    print("plot: bench/scaling.png")


if __name__ == "__main__":
    main()
