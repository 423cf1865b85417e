"""DECA for n nodes in ONE process, no Flower: the numerical oracle and a fast path for sweeps.

    for visit in schedule:                  # T rounds x B blocks
        every node: start_block(visit.block)
        for r in range(R):
            half_i = node_i.local_step()    # all nodes, from the same pre-step state
            mixed  = W @ [half_1 .. half_n] # oracle: per node over its neighbours; fast: one matmul
            node_i.apply_mix / apply_mixed  # theta = mixed, BMA fold

With compressed gossip (nodes built with choco settings) every node publishes C(half - own copy);
the oracle hands each node its neighbours' payloads (receive, apply_public_mix), the fast path
keeps only the n own copies, since every node's copy of node j equals j's own (no payload
checks, no neighbour copies: n copies of the block instead of n * (degree + 1)).

    exercised by: pytest tests/test_flower_matches_reference.py tests/test_gossip.py tests/test_choco.py
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from deca_flower.core.gossip import FLOAT64_SLICE
from deca_flower.core.node import DecaNode
from deca_flower.core.schedule import Visit
from deca_flower.core.topology import neighbours

StepCallback = Callable[[Visit, int, list[float]], None]
# after a visit, with the halves of its last step (None with compressed gossip: nodes publish only
# compressed changes); the Flower coordinator sees the same halves on the relay
VisitCallback = Callable[[Visit, list[dict[str, torch.Tensor]] | None], None]


def run_reference(
    nodes: list[DecaNode],
    weights: np.ndarray,
    schedule: list[Visit],
    steps_per_block: int,
    *,
    fast: bool = False,
    on_step: StepCallback | None = None,
    after_visit: VisitCallback | None = None,
) -> None:
    """Train all nodes in place; `weights` is the n x n mixing matrix."""
    if weights.shape != (len(nodes), len(nodes)):
        raise ValueError(f"weights are {weights.shape} for {len(nodes)} nodes")
    compressed = nodes[0].choco is not None
    if any((node.choco is not None) != compressed for node in nodes):
        raise ValueError("some nodes gossip compressed and some do not")
    for visit in schedule:
        for node in nodes:
            node.start_block(visit.block)
        halves = None
        for step in range(steps_per_block):
            if compressed:
                losses = [node.local_step(copy=False)[0] for node in nodes]
                (mix_public_fast if fast else mix_public_oracle)(nodes, weights)
            else:
                losses, halves = zip(*(node.local_step() for node in nodes))
                (mix_fast if fast else mix_oracle)(nodes, weights, list(halves))
            if on_step:
                on_step(visit, step, list(losses))
        if after_visit:
            after_visit(visit, None if halves is None else list(halves))
    for node in nodes:
        node.end_block()


def mix_oracle(nodes: list[DecaNode], weights: np.ndarray, halves: list[dict[str, torch.Tensor]]) -> None:
    """Each node mixes its own half with its neighbours' halves, exactly as over the network."""
    for i, node in enumerate(nodes):
        others = [(w, halves[j]) for j, w in neighbours(weights, i).items()]
        node.apply_mix(float(weights[i, i]), others, senders=[f"node {j}" for j in neighbours(weights, i)])


def mix_fast(nodes: list[DecaNode], weights: np.ndarray, halves: list[dict[str, torch.Tensor]]) -> None:
    """All nodes at once (fast_mixed), then each folds BMA."""
    for node, mixed in zip(nodes, fast_mixed(nodes, weights, halves)):
        node.apply_mixed(mixed)


def fast_mixed(nodes: list[DecaNode], weights: np.ndarray, halves: list[dict[str, torch.Tensor]]) -> list[list[torch.Tensor]]:
    """For every tensor, mixed[i] = sum_j W[i,j] * half[j] as one matmul; a bf16 node adds
    master_i - half_i, the difference form of gossip.mix (exact at consensus). Per node, the active
    block's tensors in block order."""
    names = list(halves[0])
    w = torch.as_tensor(weights, dtype=torch.float64)
    masters = [dict(zip(n.active.block.param_names, n.active.masters)) if n.active.has_copy else None
               for n in nodes]
    mixed_per_node: list[list[torch.Tensor]] = [[] for _ in nodes]
    for name in names:  # float64 accumulation, as gossip.mix (see why there)
        stacked = torch.stack([h[name].double() for h in halves])                 # [n, *shape]
        mixed = torch.tensordot(w.to(stacked.device), stacked, dims=1)            # [n, *shape]
        for i, own in enumerate(masters):
            if own is not None:
                mixed[i] += own[name].double() - stacked[i]
            mixed_per_node[i].append(mixed[i].float())
    return mixed_per_node


def mix_public_oracle(nodes: list[DecaNode], weights: np.ndarray) -> None:
    """Compressed gossip as over the network: every node receives its neighbours' payloads."""
    payloads = [node.publish() for node in nodes]
    for i, node in enumerate(nodes):
        nbrs = neighbours(weights, i)
        for j in nbrs:
            node.receive(f"node {j}", payloads[j])
        node.apply_public_mix({f"node {j}": w for j, w in nbrs.items()})


def mix_public_fast(nodes: list[DecaNode], weights: np.ndarray) -> None:
    """Compressed gossip from the n own copies only: node j's own copy is every neighbour's copy
    of it. The same sums in the same order as the oracle, so the same bits."""
    for node in nodes:
        node.publish()
    for i, node in enumerate(nodes):
        others = [(w, nodes[j].public.own) for j, w in neighbours(weights, i).items()]
        node.apply_mixed(node.public.mixed_with(node.active.masters, others))


def consensus_distance(blocks: list[dict[str, torch.Tensor]]) -> float:
    """Mean over nodes of ||x_i - mean x||^2 (measurement only; nothing is averaged into a model).

    In float64 (the nodes agree to a few digits, so float32 would measure rounding), a slice of
    FLOAT64_SLICE elements at a time: two cache-sized buffers instead of an n x block stack of
    float64 copies (1.4 s -> 0.1 s for four SmolLM2 embedding blocks)."""
    device = next(iter(blocks[0].values())).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    mean_buf = torch.empty(FLOAT64_SLICE, dtype=torch.float64, device=device)
    diff_buf = torch.empty_like(mean_buf)
    for name in blocks[0]:
        flats = [b[name].reshape(-1) for b in blocks]
        for start in range(0, flats[0].numel(), FLOAT64_SLICE):
            parts = [f[start:start + FLOAT64_SLICE] for f in flats]
            mean, diff = mean_buf[:len(parts[0])], diff_buf[:len(parts[0])]
            mean.copy_(parts[0])
            for part in parts[1:]:
                mean.add_(part)
            mean.div_(len(parts))
            for part in parts:
                torch.sub(part, mean, out=diff)
                total += torch.dot(diff, diff)
    return float(total) / len(blocks)
