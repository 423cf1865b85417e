"""One block visit with compressed gossip on the embedded default (SmolLM2-135M, CPU fp32): how far
the nodes disagree and how far their mean drifts from the uncompressed run, step by step.

    python bench/compression_visit.py [variant ...]      (default: all, ~2 CPU-minutes each)

bbc-small's first visit (the top block of 6 layers, 6 local steps, 4 nodes on its Erdos-Renyi
graph, seed 0), reference fast path, the same minibatches in every variant. Per step: the mean
loss, the consensus distance of the block (mean ||x_i - mean x||^2) and ||mean x - mean x of
`none`||. Besides the shipped codecs, the alternatives that core/choco.py decides against:
`int8-mix-first` mixes from the first exchange on (the copies then hold int8 of whole weights),
`int4-first-int4` sends the first payload in int4 too; and top-k (fraction 0.1), which the config
refuses on this bench's figures: `topk` at its default gamma (2 x fraction), `topk-gamma1` at
gamma = 1, `topk-int8-first2` with the first two payloads of a visit in int8, then top-k.
"""

from __future__ import annotations

import contextlib
import platform
import sys
import time

import torch

from deca_flower.config import DecaConfig
from deca_flower.core.choco import ChocoSettings, PublicCopies, default_gamma
from deca_flower.core.compression import Codec
from deca_flower.core.gossip import public_mix
from deca_flower.core.reference import consensus_distance, run_reference
from deca_flower.core.schedule import build_schedule
from deca_flower.core.topology import build_graph, metropolis_hastings
from deca_flower.reference_run import build_nodes

SETTING = dict(num_nodes=4, topology="erdos_renyi", layers_per_block=6, steps_per_block=6, rounds=1,
               block_order="descending", eval_samples=8, seed=0)
VARIANTS = {"none": "none", "int8": "int8", "int4": "int4", "topk": "int8", "int8-mix-first": "int8",
            "int4-first-int4": "int4", "topk-gamma1": "int8", "topk-int8-first2": "int8"}  # -> compression
TOPK = Codec("topk", fraction=0.1)
TOPK_GAMMA = {"topk": default_gamma(TOPK), "topk-gamma1": 1.0, "topk-int8-first2": default_gamma(TOPK)}


@contextlib.contextmanager
def alternative(variant: str):
    """The code as it would be without one of core/choco.py's decisions."""
    saved = ChocoSettings.codec_at, PublicCopies.mixed_with
    if variant == "int8-mix-first":
        PublicCopies.mixed_with = lambda self, half, others: public_mix(list(half), self.own, self.settings.gamma, others)
    if variant == "int4-first-int4":
        ChocoSettings.codec_at = lambda self, seq: self.codec
    if variant == "topk-int8-first2":
        ChocoSettings.codec_at = lambda self, seq: Codec("int8", self.codec.chunk) if seq < 2 else self.codec
    try:
        yield
    finally:
        ChocoSettings.codec_at, PublicCopies.mixed_with = saved


def visit(variant: str) -> list[dict]:
    cfg = DecaConfig(**SETTING, compression=VARIANTS[variant])
    nodes = [rt.node for rt in build_nodes(cfg)]
    for node in nodes if variant in TOPK_GAMMA else []:  # the config refuses topk: the nodes get its settings
        node.choco = ChocoSettings(TOPK, TOPK_GAMMA[variant])
    weights = metropolis_hastings(build_graph(cfg.topology, cfg.num_nodes, seed=cfg.seed, edge_prob=cfg.edge_prob))
    rows: list[dict] = []

    def on_step(_visit, _step, losses: list[float]) -> None:
        blocks = [{k: t.detach().clone() for k, t in n.block_values().items()} for n in nodes]
        rows.append({"loss": sum(losses) / len(losses), "consensus": consensus_distance(blocks),
                     "mean": {k: torch.stack([b[k] for b in blocks]).mean(0) for k in blocks[0]}})

    with alternative(variant):
        run_reference(nodes, weights, build_schedule(len(nodes[0].blocks), 1, cfg.block_order)[:1], cfg.steps_per_block,
                      fast=True, on_step=on_step)
    return rows


def main() -> None:
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    chosen = sys.argv[1:] or list(VARIANTS)
    if chosen[0] != "none":
        chosen = ["none", *chosen]  # the reference trajectory
    print("| variant | step | loss | consensus distance | off none's mean | visit s |")
    print("|---|---|---|---|---|---|")
    reference = None
    for variant in dict.fromkeys(chosen):
        tic = time.time()
        rows = visit(variant)
        seconds = time.time() - tic
        reference = reference or [r["mean"] for r in rows]
        for step, (row, ref) in enumerate(zip(rows, reference), start=1):
            off = sum(float((row["mean"][k] - ref[k]).pow(2).sum()) for k in ref) ** 0.5
            print(f"| {variant} | {step} | {row['loss']:.4f} | {row['consensus']:.3g} | {off:.3g} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
