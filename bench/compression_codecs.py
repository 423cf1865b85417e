"""What each gossip codec sends and how far off it leaves a copy (SmolLM2-135M weights, CPU), and
which consensus step size gamma lets compressed gossip reach consensus.

    python bench/compression_codecs.py

1. Per codec, on the top 6-layer block (bbc-small's blocks) and on the embedding (the largest
   block): bytes against fp32, the relative error ||C(x) - x|| / ||x|| for x = the weights
   themselves (what a visit's first payload sends: copies start at zero) and for x = a dense
   change of an Adam step's size, lr * N(0, 1) (later payloads: Adam steps and gossip corrections
   move every entry; Adam's very first update, lr * sign, is exact in int8 and int4). What
   compressing costs in time shows in the wall time per step of the runs themselves.
2. CHOCO-gossip without local steps on 5 nodes of an Erdos-Renyi graph (p = 0.5, seed 0) that
   start from N(0, 1) blocks: the spread max |x_i - mean x| after 6, 12, 30 and 60 steps relative
   to the start, per codec and gamma, and for uncompressed gossip (x = W x) beside them.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from deca_flower.core.choco import ChocoSettings, PublicCopies
from deca_flower.core.compression import Codec, add_block, encode_block, payload_bytes
from deca_flower.core.topology import build_graph, metropolis_hastings, neighbours
from deca_flower.models import resolve_model_source

CODECS = [Codec("int8", 0), Codec("int8", 64), Codec("int8", 256), Codec("int4", 32), Codec("int4", 64),
          Codec("int4", 128), Codec("topk", fraction=0.05), Codec("topk", fraction=0.1), Codec("topk", fraction=0.25)]
LR = 1e-4


def relative_error(codec: Codec, block: dict[str, torch.Tensor]) -> float:
    copies = {k: torch.zeros_like(v) for k, v in block.items()}
    add_block(codec, copies, encode_block(codec, block.items(), 0))
    error = sum(float((copies[k] - v).double().pow(2).sum()) for k, v in block.items())
    return (error / sum(float(v.double().pow(2).sum()) for v in block.values())) ** 0.5


def codec_table(blocks: dict[str, dict[str, torch.Tensor]]) -> None:
    print("| block | codec | x fewer bytes than fp32 | error, weights | error, dense change |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    for name, block in blocks.items():
        step = {k: LR * torch.randn_like(v) for k, v in block.items()}
        fp32 = sum(v.numel() * 4 for v in block.values())
        for codec in CODECS:
            payload = encode_block(codec, block.items(), 0)
            print(f"| {name} | {codec} | {fp32 / payload_bytes(payload):.2f} | {relative_error(codec, block):.4f} "
                  f"| {relative_error(codec, step):.4f} |")


def spread(values: list[list[torch.Tensor]]) -> float:
    return max(float((torch.stack(t) - torch.stack(t).mean(0)).abs().max()) for t in zip(*values))


CHECKPOINTS = (6, 12, 30, 60)


def consensus(codec: Codec | None, gamma: float = 1.0) -> list[float]:
    """Spread at each checkpoint relative to the start: gossip only, compressed (codec) or not (None)."""
    torch.manual_seed(0)
    weights = metropolis_hastings(build_graph("erdos_renyi", 5, seed=0, edge_prob=0.5))
    shapes = [torch.Size([12, 40]), torch.Size([7])]
    copies = [PublicCopies(ChocoSettings(codec, gamma), ["w", "b"], shapes, torch.device("cpu")) for _ in range(5)] \
        if codec else []
    values = [[torch.randn(s) for s in shapes] for _ in range(5)]
    start, out = spread(values), []
    for step in range(1, max(CHECKPOINTS) + 1):
        if codec is None:
            w = torch.as_tensor(weights, dtype=torch.float32)
            values = [list(t) for t in zip(*(torch.tensordot(w, torch.stack(t), dims=1) for t in zip(*values)))]
        else:
            payloads = [c.publish(v) for c, v in zip(copies, values)]
            for i, c in enumerate(copies):
                for j in neighbours(weights, i):
                    c.receive(f"node {j}", payloads[j])
            values = [c.mixed(v, {f"node {j}": w for j, w in neighbours(weights, i).items()})
                      for i, (c, v) in enumerate(zip(copies, values))]
        if step in CHECKPOINTS:
            out.append(spread(values) / start)
    return out


def consensus_table() -> None:
    print("| codec | gamma | spread after 6 | 12 | 30 | 60 steps |")
    print("|---|---|---|---|---|---|")
    print("| none | - | " + " | ".join(f"{x:.2e}" for x in consensus(None)) + " |")
    for codec in (Codec("int8", 64), Codec("int4", 64), Codec("topk", fraction=0.1), Codec("topk", fraction=0.25)):
        for gamma in (1.0, 0.8, 0.6, 0.4, 0.2):
            print(f"| {codec} | {gamma} | " + " | ".join(f"{x:.2e}" for x in consensus(codec, gamma)) + " |")


def main() -> None:
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    weights = safe_open(str(Path(resolve_model_source("smollm2-135m-instruct")) / "model.safetensors"), "pt")
    top = [k for k in weights.keys() if any(f".layers.{i}." in k for i in range(24, 30))]
    blocks = {"layers 24-29": {k: weights.get_tensor(k).float() for k in top},
              "embedding": {"embed": weights.get_tensor("model.embed_tokens.weight").float()}}
    codec_table(blocks)
    print()
    consensus_table()


if __name__ == "__main__":
    main()
