"""Bytes on the wire per exchange: the train message a node receives (its neighbours' half-step
blocks, or compressed payloads, with mixing weights and step instruction) versus block bytes x
degree, and how many times fewer bytes each compression mode puts on the wire per step.

    python bench/wire_bytes.py [--model smollm2-135m-instruct] [--nodes 4] [--topology erdos_renyi]
                               [--steps 8]

The bytes are those Flower uploads in deployment: every distinct object of the message deflated
once (internals.content_wire_bytes). The blocks hold random values: Flower stores equal array
chunks once, so zeros would look cheaper than real weights. A compressed payload's size follows
from the block's shapes alone (core/compression.py); it is encoded here from a random change of
an Adam step's size. A visit's first payload is int8 whatever the codec (core/choco.py), so the
per-step figure is the mean over a visit of --steps steps: (first + (steps - 1) x later) / steps.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from deca_flower.config import DecaConfig
from deca_flower.core.choco import ChocoSettings
from deca_flower.core.compression import Codec, encode_block
from deca_flower.core.topology import build_graph, metropolis_hastings, neighbours
from deca_flower.flower.internals import content_wire_bytes
from deca_flower.methods import method_blocks
from deca_flower.plan import make_plan, meta_model
from deca_flower.protocol import messages as pm
from deca_flower.protocol.tensors import block_to_record, payload_to_record

CODECS = (Codec("int8", DecaConfig.compression_chunk), Codec("int4", DecaConfig.compression_chunk))  # the offered modes


def message_bytes(ask: pm.TrainStep) -> int:
    wire = content_wire_bytes(ask.to_content())
    if wire is None:
        sys.exit("this Flower version is untested: its message objects cannot be measured")
    return wire


def compressed_message_bytes(codec: Codec, seq: int, block: dict[str, torch.Tensor], base: pm.TrainStep) -> int:
    """The train message with each neighbour's payload number `seq` of `block` in place of its half."""
    records = {j: payload_to_record(encode_block(codec, ((n, 1e-4 * torch.randn_like(t)) for n, t in block.items()), seq))
               for j in base.weights}
    return message_bytes(pm.TrainStep(step=base.step, block=base.block, self_weight=base.self_weight,
                                      weights=base.weights, halves=records))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DecaConfig.model)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--topology", default="erdos_renyi")
    parser.add_argument("--steps", type=int, default=DecaConfig.steps_per_block, help="inner steps per block visit")
    args = parser.parse_args()
    cfg = DecaConfig(model=args.model, num_nodes=args.nodes, topology=args.topology, steps_per_block=args.steps)
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# machine: {platform.machine()}, torch {torch.__version__}")
    torch.manual_seed(0)
    model = meta_model(cfg.model)
    blocks, _ = method_blocks(model, cfg)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    weights = metropolis_hastings(build_graph(cfg.topology, cfg.num_nodes, seed=cfg.seed, edge_prob=cfg.edge_prob))
    node = max(range(cfg.num_nodes), key=lambda i: len(neighbours(weights, i)))
    nbrs = neighbours(weights, node)
    print("| block | params | degree | block bytes x degree | message bytes | ratio |")
    print("|---|---|---|---|---|---|")
    ratios, compressed_rows = [], []
    for block in (blocks[0], blocks[len(blocks) // 2], blocks[-1]):
        halves = {j: {n: torch.randn(shapes[n]) for n in block.param_names} for j in nbrs}  # one per neighbour
        ask = pm.TrainStep(step=1, block=block.index, self_weight=float(weights[node, node]), weights=nbrs,
                           halves={j: block_to_record(half) for j, half in halves.items()})
        payload = sum(t.numel() * t.element_size() for half in halves.values() for t in half.values())
        wire = message_bytes(ask)
        ratios.append(wire / payload)
        print(f"| {block.name} | {sum(shapes[n].numel() for n in block.param_names):,} | {len(nbrs)} | {payload:,} "
              f"| {wire:,} | {wire / payload:.4f} |")
        one_half = next(iter(halves.values()))
        for codec in CODECS:
            settings = ChocoSettings(codec)
            first = compressed_message_bytes(settings.codec_at(0), 0, one_half, ask)
            later = compressed_message_bytes(settings.codec_at(1), 1, one_half, ask)
            per_step = (first + (cfg.steps_per_block - 1) * later) / cfg.steps_per_block
            compressed_rows.append((block.name, codec, wire, first, later, per_step))
    print(f"\nworst ratio {max(ratios):.4f} (goal <= 1.02)")
    print(f"\nCompressed gossip, the same messages (bytes Flower uploads; a visit of {cfg.steps_per_block} steps):\n")
    print("| block | compression | uncompressed message | first step (int8) | later steps | mean per step "
          "| x fewer bytes per step |")
    print("|---|---|---|---|---|---|---|")
    for name, codec, wire, first, later, per_step in compressed_rows:
        print(f"| {name} | {codec} | {wire:,} | {first:,} | {later:,} | {per_step:,.0f} | {wire / per_step:.2f} |")
    print()
    for codec in (None, *CODECS):
        plan = make_plan(cfg.replace(compression=codec.name) if codec else cfg, model=model)
        print(f"plan, {codec.name if codec else 'none'}: mean bytes per exchange {plan.bytes_per_exchange_mean / 2**20:.1f}"
              f" MiB per node (mean degree {plan.mean_degree:.2f}), per node per run "
              f"{plan.bytes_per_node_run / 2**30:.2f} GiB; FedAvg at equal local steps "
              f"{plan.fedavg_bytes_per_node_run / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
