"""Neighbour mixing of one block: mixed_i = W[i,i] * own + sum_j W[i,j] * half_j.

With a bf16 model the neighbours' halves are bf16 while `own` is the node's fp32 master, so the
mix takes the difference form own + sum_j W[i,j] * (half_j - sent_i), sent_i being what this node
sent (its bf16 half): equal in exact arithmetic, but nodes that agree get exactly their own block
back, where the plain form would hand BMA (1 - W[i,i]) x bf16 rounding / lr of noise as "disagreement".

Validation lives here too, so that nothing malformed is ever averaged into a model.
"""

from __future__ import annotations

import math

import torch

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


def _all_finite(tensor: torch.Tensor) -> bool:
    """A sum is finite only if every element is (NaN and Inf never cancel out), and it is one pass
    without a mask; only a sum that overflowed is checked element by element."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def mix(own: list[torch.Tensor], self_weight: float, others: list[tuple[float, list[torch.Tensor]]],
        sent: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Weighted sum, accumulated in float64 and returned as fp32; weights must sum to 1.
    `sent`: the (bf16) values this node sent for `own`, when they differ: the difference form above.

    float64 matters: BMA divides theta - mixed by lr, so fp32 rounding in the mix (x/3 + x/3 + x/3 != x)
    would become an lr-sized Adam step on weights the nodes already agree on. It is accumulated
    FLOAT64_SLICE elements at a time in one reused buffer: the same sums as a float64 copy of the
    whole block, without allocating one (226 MB for the SmolLM2 embeddings)."""
    total = self_weight + sum(w for w, _ in others)
    if not math.isclose(total, 1.0, abs_tol=1e-9):
        raise ValueError(f"mixing weights sum to {total}, not 1")
    out = []
    for k, tensor in enumerate(own):
        numel = tensor.numel()
        flat_others = []
        for weight, tensors in others:
            if tensors[k].numel() != numel:
                raise ValueError(f"tensor {k}: {tensors[k].numel()} elements to mix into {numel}")
            flat_others.append((weight, tensors[k].reshape(-1)))
        mixed = torch.empty(tensor.shape, dtype=torch.float32, device=tensor.device)
        flat_own, flat_mixed = tensor.reshape(-1), mixed.view(-1)
        buffer = torch.empty(min(numel, FLOAT64_SLICE), dtype=torch.float64, device=tensor.device)
        for start in range(0, numel, FLOAT64_SLICE):
            end = min(start + FLOAT64_SLICE, numel)
            acc = buffer[:end - start].copy_(flat_own[start:end])
            if sent is None:
                acc.mul_(self_weight)
            else:  # own - (1 - W_ii) * sent_i + sum_j W_ij * half_j
                acc.add_(sent[k].reshape(-1)[start:end], alpha=self_weight - 1.0)
            for weight, flat in flat_others:
                acc.add_(flat[start:end].to(acc.device), alpha=weight)  # added in float64 without a float64 copy
            flat_mixed[start:end].copy_(acc)
        out.append(mixed)
    return out
