"""Neighbour mixing of one block: mixed_i = W[i,i] * own + sum_j W[i,j] * half_j (and CHOCO's mix on
public copies, public_mix).

With a bf16 model the neighbours' halves are bf16 while `own` is the node's fp32 master, so the
mix takes the difference form own + sum_j W[i,j] * (half_j - sent_i), sent_i being what this node
sent (its bf16 half): equal in exact arithmetic, but nodes that agree get exactly their own block
back, where the plain form would hand BMA (1 - W[i,i]) x bf16 rounding / lr of noise as "disagreement".

Validation lives here too, so that nothing malformed is ever averaged into a model: the blocks
(check_block) and the weights the relay announces (check_mixing_weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import networkx as nx
import torch

from deca_flower.core.topology import metropolis_hastings

FLOAT64_SLICE = 1 << 18  # elements summed in float64 at a time (2 MiB): mix() and consensus_distance()


class BlockError(ValueError):
    """A received block does not match the expected block (names, shapes, dtype, values)."""


def check_block(received: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], sender: str,
                max_deviation: float = 0.0) -> None:
    """Raise BlockError unless `received` has exactly the expected names, shapes, dtypes, finite values,
    and (max_deviation > 0) lies within max_deviation * ||own block|| of the node's own block."""
    missing = sorted(set(expected) - set(received))
    extra = sorted(set(received) - set(expected))
    if missing or extra:
        raise BlockError(f"block from {sender}: missing tensors {missing[:3]}, unexpected {extra[:3]}")
    gaps = []
    for name, ref in expected.items():
        got = received[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise BlockError(f"block from {sender}: '{name}' has shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        if got.dtype != ref.dtype:
            raise BlockError(f"block from {sender}: '{name}' has dtype {got.dtype}, expected {ref.dtype}")
        # with a deviation limit, the distance to the own (finite) tensor is the finiteness check too:
        # it is finite only if every received element is; one pass over the block instead of two
        gap = float(torch.dist(got.float(), ref.float())) if max_deviation > 0 else math.inf
        if not math.isfinite(gap) and not _all_finite(got):
            raise BlockError(f"block from {sender}: '{name}' contains NaN or Inf")
        gaps.append(gap)
    if max_deviation > 0:  # neighbours agree to within a few percent; a far-off block is an attack or a bug
        own = math.sqrt(sum(float(torch.linalg.vector_norm(t.float())) ** 2 for t in expected.values()))
        gap = math.sqrt(sum(g ** 2 for g in gaps))
        if gap > max_deviation * max(own, 1e-12):
            raise BlockError(f"block from {sender} is {gap / max(own, 1e-12):.3g} x ||own block|| away "
                             f"(limit max-block-deviation={max_deviation})")


class MixingWeightsError(ValueError):
    """The mixing weights a node was sent are not the Metropolis-Hastings weights of the graph it knows."""


def check_mixing_weights(node: int, self_weight: float, neighbour_weights: Mapping[int, float], graph: nx.Graph,
                         atol: float = 1e-12) -> None:
    """Raise MixingWeightsError unless self_weight and neighbour_weights {partition id: W[node, j]} are
    exactly row `node` of W = metropolis_hastings(graph): every weight finite and >= 0, a weight for
    each neighbour of `node` in `graph` and for no other node.

    `graph`: the one the node knows (the announced topology less the nodes it was told dropped out),
    labelled by partition id. The relay sends the weights with every step; a relay that inflates
    them (self -1e4, neighbour 1e4 + 1 sum to 1 and move the node 1e4 times its distance to that
    neighbour) or re-routes a block through a node that is no neighbour is refused here."""
    if node in neighbour_weights:
        raise MixingWeightsError(f"node {node} was sent a neighbour weight for itself")
    told = {node: self_weight, **neighbour_weights}
    bad = {j: w for j, w in told.items()
           if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0}
    if bad:
        raise MixingWeightsError(f"node {node} was sent mixing weights that are negative or not finite numbers: {bad}")
    if node not in graph:
        raise MixingWeightsError(f"node {node} is not in the graph it knows (nodes {sorted(graph.nodes)})")
    row = metropolis_hastings(graph, size=max(graph.nodes) + 1)[node]
    expected = {j: float(w) for j, w in enumerate(row) if w > 0 or j == node}
    strangers = sorted(set(told) - set(expected))
    missing = sorted(set(expected) - set(told))
    if strangers or missing:
        found = ([f"weights for nodes {strangers} that are not its neighbours"] if strangers else []) + (
            [f"no weights for its neighbours {missing}"] if missing else [])
        raise MixingWeightsError(f"node {node} was sent {' and '.join(found)} "
                                 f"(its neighbours in the graph it knows: {sorted(set(expected) - {node})})")
    wrong = {j: (told[j], w) for j, w in expected.items() if not math.isclose(told[j], w, rel_tol=0.0, abs_tol=atol)}
    if wrong:
        raise MixingWeightsError(f"node {node} was sent mixing weights that differ from the Metropolis-Hastings "
                                 "weights of its graph, {partition id: (sent, expected)}: " + str(wrong))


def _all_finite(tensor: torch.Tensor) -> bool:
    """A sum is finite only if every element is (NaN and Inf never cancel out), and it is one pass
    without a mask; only a sum that overflowed is checked element by element."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def mix(own: list[torch.Tensor], self_weight: float, others: list[tuple[float, list[torch.Tensor]]],
        sent: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Weighted sum, accumulated in float64 and returned as fp32; weights must sum to 1.
    `sent`: the (bf16) values this node sent for `own`, when they differ: the difference form above.

    float64 matters: BMA divides theta - mixed by lr, so fp32 rounding in the mix (x/3 + x/3 + x/3 != x)
    would become an lr-sized Adam step on weights the nodes already agree on (see _sliced_float64)."""
    total = self_weight + sum(w for w, _ in others)
    if not math.isclose(total, 1.0, abs_tol=1e-9):
        raise ValueError(f"mixing weights sum to {total}, not 1")
    out = []
    for k, tensor in enumerate(own):
        flat_others = [(weight, tensors[k].reshape(-1)) for weight, tensors in others]
        if any(flat.numel() != tensor.numel() for _, flat in flat_others):
            raise ValueError(f"tensor {k}: other blocks' tensors of another size than its {tensor.numel()} elements")
        flat_sent = None if sent is None else sent[k].reshape(-1)

        def weighted_sum(acc: torch.Tensor, start: int, end: int, flat_others=flat_others, flat_sent=flat_sent) -> None:
            if flat_sent is None:
                acc.mul_(self_weight)
            else:  # own - (1 - W_ii) * sent_i + sum_j W_ij * half_j
                acc.add_(flat_sent[start:end], alpha=self_weight - 1.0)
            for weight, flat in flat_others:
                acc.add_(flat[start:end].to(acc.device), alpha=weight)  # added in float64 without a float64 copy

        out.append(_sliced_float64(tensor, weighted_sum))
    return out


def public_mix(half: list[torch.Tensor], own_copy: list[torch.Tensor], gamma: float,
               others: list[tuple[float, list[torch.Tensor]]]) -> list[torch.Tensor]:
    """CHOCO's mix (core/choco.py): half + gamma * sum_j W_ij * (copy_j - own_copy), in float64 as
    mix() (BMA divides what it moves by lr), returned as fp32. Summed as differences, so that a node
    whose copies agree gets its half back bit for bit."""
    out = []
    for k, tensor in enumerate(half):
        numel = tensor.numel()
        flat_own = own_copy[k].reshape(-1)
        flat_others = [(gamma * weight, copy[k].reshape(-1)) for weight, copy in others]
        if any(flat.numel() != numel for _, flat in flat_others) or flat_own.numel() != numel:
            raise ValueError(f"tensor {k}: copies of another size than its {numel} elements")
        diff_buffer = torch.empty(min(numel, FLOAT64_SLICE), dtype=torch.float64, device=tensor.device)

        def differences(acc: torch.Tensor, start: int, end: int, flat_own=flat_own, flat_others=flat_others,
                        diff_buffer=diff_buffer) -> None:
            diff = diff_buffer[:end - start]
            for scaled_weight, flat in flat_others:
                acc.add_(diff.copy_(flat[start:end]).sub_(flat_own[start:end]), alpha=scaled_weight)

        out.append(_sliced_float64(tensor, differences))
    return out


def _sliced_float64(tensor: torch.Tensor, accumulate: Callable[[torch.Tensor, int, int], None]) -> torch.Tensor:
    """An fp32 tensor of `tensor`'s shape, made FLOAT64_SLICE elements [start, end) at a time:
    accumulate(acc, start, end) works on acc, a float64 buffer that holds those elements of `tensor`.
    One reused buffer gives the same sums as a float64 copy of the whole block without allocating
    one (226 MB for the SmolLM2 embeddings)."""
    numel = tensor.numel()
    mixed = torch.empty(tensor.shape, dtype=torch.float32, device=tensor.device)
    flat, flat_mixed = tensor.reshape(-1), mixed.view(-1)
    buffer = torch.empty(min(numel, FLOAT64_SLICE), dtype=torch.float64, device=tensor.device)
    for start in range(0, numel, FLOAT64_SLICE):
        end = min(start + FLOAT64_SLICE, numel)
        acc = buffer[:end - start].copy_(flat[start:end])
        accumulate(acc, start, end)
        flat_mixed[start:end].copy_(acc)
    return mixed
