"""What the BMA consensus signal does to Adam, per inner step and per convention, measured.

    python bench/bma_signal.py [--run-config "..."] [--block 14] [--variants none,scaled,gradient:10]

Trains every node of the run config (default: the main job, 4 nodes) on one block for one visit
(R inner steps), once per variant, from the same start and minibatches, with the single-process
fast mix. Per inner step, mean over nodes:
- rms g, rms h: the fresh gradient and the consensus signal h of the variant's discrepancy;
- g/m': the fresh gradient's share of Adam's first moment, ||(1-a1) g|| / ||m'||;
- dm/m, dv/v: the share of Adam's moments that the fold put there, ||m - m'|| / ||m|| and
  sum|v - v'| / sum(v) after the fold (0 without BMA; ~ the folded term's share when h >> m');
- cos(u,-g): cosine between the local Adam step u = half - theta and the descent direction -g;
- consensus: mean over nodes of ||x_i - mean x||^2 of the block after the mix.
A variant is `none` (bma=none), a discrepancy name, or `gradient:S` (discrepancy=gradient, bma-strength=S).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from deca_flower.cli import parse_overrides
from deca_flower.config import DecaConfig
from deca_flower.core.reference import consensus_distance, fast_mixed
from deca_flower.core.topology import build_graph, metropolis_hastings
from deca_flower.reference_run import build_nodes
from deca_flower.results import code_version

DEFAULT_VARIANTS = "none,scaled,raw,normalized,gradient:1,gradient:10,gradient:100,gradient:1000"
COLUMNS = ("step", "rms g", "rms h", "h/g", "g/m'", "dm/m", "dv/v", "cos(u,-g)", "consensus")


def variant_config(cfg: DecaConfig, variant: str) -> DecaConfig:
    if variant == "none":
        return cfg.replace(bma="none")
    discrepancy, _, strength = variant.partition(":")
    return cfg.replace(bma="full", discrepancy=discrepancy, bma_strength=float(strength or 1.0))


def norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum(t.double().pow(2).sum() for t in tensors)))


def visit(cfg: DecaConfig, block: int) -> list[dict[str, float]]:
    """One visit of `block` by every node; per inner step, the figures above (mean over nodes)."""
    runtimes = build_nodes(cfg)
    nodes = [r.node for r in runtimes]
    weights = metropolis_hastings(build_graph(cfg.topology, cfg.num_nodes, seed=cfg.seed, edge_prob=cfg.edge_prob))
    a1 = cfg.beta1
    rows = []
    for node in nodes:
        node.start_block(block)
    for step in range(runtimes[0].steps_per_visit):
        seen: list[dict[str, list[torch.Tensor]]] = []
        for node in nodes:  # record theta and the fresh gradient as Adam takes its step
            optimizer, take_step = node.optimizer, node.optimizer.step
            record: dict[str, list[torch.Tensor]] = {}

            def step_and_record(optimizer=optimizer, take_step=take_step, record=record) -> None:
                record["theta"] = [m.detach().clone() for m in optimizer.masters]
                record["g"] = [m.grad.clone() if m.grad is not None else torch.zeros_like(m) for m in optimizer.masters]
                take_step()

            optimizer.step = step_and_record
            seen.append(record)
        halves = [node.local_step()[1] for node in nodes]
        figures = []
        for node, record, mixed in zip(nodes, seen, fast_mixed(nodes, weights, halves)):
            optimizer = node.optimizer
            states = [optimizer.adam.state[m] for m in optimizer.masters]
            m_adam = [s["exp_avg"].clone() for s in states]
            v_adam = [s["exp_avg_sq"].clone() for s in states]
            u = [m.detach() - t for m, t in zip(optimizer.masters, record["theta"])]
            h = optimizer.consensus_signal(mixed)
            node.apply_mixed(mixed)
            g, elements = record["g"], sum(t.numel() for t in record["g"])
            figures.append({
                "rms g": norm(g) / elements**0.5, "rms h": norm(h) / elements**0.5,
                "g/m'": (1 - a1) * norm(g) / max(norm(m_adam), 1e-30),
                "dm/m": (norm([s["exp_avg"] - m for s, m in zip(states, m_adam)])
                         / max(norm([s["exp_avg"] for s in states]), 1e-30)),
                "dv/v": (sum(float((s["exp_avg_sq"] - v).double().abs().sum()) for s, v in zip(states, v_adam))
                         / max(sum(float(s["exp_avg_sq"].double().sum()) for s in states), 1e-30)),
                "cos(u,-g)": -sum(float((a.double() * b.double()).sum()) for a, b in zip(u, g)) / max(norm(u) * norm(g), 1e-30),
            })
        row = {"step": step + 1, **{k: sum(f[k] for f in figures) / len(figures) for k in figures[0]}}
        row["h/g"] = row["rms h"] / max(row["rms g"], 1e-30)
        row["consensus"] = consensus_distance([n.block_values() for n in nodes])
        rows.append(row)
    for node in nodes:
        node.end_block()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="", help="overrides of the main job's config")
    parser.add_argument("--block", type=int, default=14, help="block index (0 = embeddings)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    args = parser.parse_args()
    cfg = DecaConfig.from_run_config(parse_overrides(args.run_config))
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} on "
          f"{torch.get_num_threads()} threads; code {code_version()}")
    print(f"# {cfg.num_nodes} nodes, {cfg.topology}, {cfg.layers_per_block} layers per block, block {args.block}, "
          f"R={cfg.steps_per_block}, lr {cfg.lr}, a1 {cfg.beta1}, b1 {cfg.bma_beta1}, b2 {cfg.bma_beta2}")
    for variant in args.variants.split(","):
        rows = visit(variant_config(cfg, variant), args.block)
        print(f"\n{variant}\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
        for row in rows:
            print("| " + " | ".join(f"{row[c]:.3g}" if c != "step" else str(row[c]) for c in COLUMNS) + " |", flush=True)


if __name__ == "__main__":
    main()
