"""Bytes on the wire per exchange: the train message a node receives (its neighbours' half-step
blocks, mixing weights and step instruction) versus block bytes x degree.

    python bench/wire_bytes.py [--model smollm2-135m-instruct] [--nodes 4] [--topology erdos_renyi]

The bytes are those Flower uploads in deployment: every distinct object of the message deflated
once (internals.content_wire_bytes). The blocks hold random values: Flower stores equal array
chunks once, so zeros would look cheaper than real weights.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from deca_flower.config import DecaConfig
from deca_flower.core.topology import build_graph, metropolis_hastings, neighbours
from deca_flower.flower.internals import content_wire_bytes
from deca_flower.methods import method_blocks
from deca_flower.plan import make_plan, meta_model
from deca_flower.protocol import messages as pm
from deca_flower.protocol.tensors import block_to_record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DecaConfig.model)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--topology", default="erdos_renyi")
    args = parser.parse_args()
    cfg = DecaConfig(model=args.model, num_nodes=args.nodes, topology=args.topology)
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# machine: {platform.machine()}, torch {torch.__version__}")
    model = meta_model(cfg.model)
    blocks, _ = method_blocks(model, cfg)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    weights = metropolis_hastings(build_graph(cfg.topology, cfg.num_nodes, seed=cfg.seed, edge_prob=cfg.edge_prob))
    plan = make_plan(cfg, model=model)
    print("| block | params | degree | block bytes x degree | message bytes | ratio |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for block in (blocks[0], blocks[len(blocks) // 2], blocks[-1]):
        node = max(range(cfg.num_nodes), key=lambda i: len(neighbours(weights, i)))
        nbrs = neighbours(weights, node)
        halves = {j: {n: torch.randn(shapes[n]) for n in block.param_names} for j in nbrs}  # one per neighbour
        ask = pm.TrainStep(step=1, block=block.index, self_weight=float(weights[node, node]), weights=nbrs,
                           halves={j: block_to_record(half) for j, half in halves.items()})
        payload = sum(t.numel() * t.element_size() for half in halves.values() for t in half.values())
        wire = content_wire_bytes(ask.to_content())
        if wire is None:
            sys.exit("this Flower version is untested: its message objects cannot be measured")
        ratios.append(wire / payload)
        print(f"| {block.name} | {sum(shapes[n].numel() for n in block.param_names):,} | {len(nbrs)} | {payload:,} "
              f"| {wire:,} | {wire / payload:.4f} |")
    print(f"\nworst ratio {max(ratios):.4f} (goal <= 1.02)")
    print(f"plan: mean bytes per exchange {plan.bytes_per_exchange_mean / 2**20:.1f} MiB per node (mean degree "
          f"{plan.mean_degree:.2f}), per node per run {plan.bytes_per_node_run / 2**30:.2f} GiB; "
          f"FedAvg at equal local steps {plan.fedavg_bytes_per_node_run / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
