"""One DECA client: its model copy, its minibatch stream, and the active block's Adam.

Per inner step the caller does

    half = node.local_step()                 # Adam on the active block: theta -> half
    ... exchange halves with the neighbours ...
    node.apply_mix(w_ii, [(w_ij, half_j)])   # theta = mixed, BMA folded into the moments

With compressed gossip (choco set: core/choco.py) the exchange is of payloads instead:

    node.local_step()
    payload = node.publish()                 # C(half - own public copy), sent to every neighbour
    node.receive(sender_j, payload_j)        # per neighbour: checked, then added to its copy
    node.apply_public_mix({sender_j: w_ij})  # theta = half + gamma * sum_j w_ij (copy_j - own copy); BMA

The same calls are made by the single-process reference (reference.py) and by the Flower
ClientApp, which is why both give the same numbers for the same seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from deca_flower.core.blocks import ActiveBlock, Block
from deca_flower.core.choco import ChocoSettings, PublicCopies
from deca_flower.core.gossip import check_block, mix
from deca_flower.core.optimizer import BlockAdam


@dataclass(frozen=True)
class AdamSettings:
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    bma: str = "full"
    bma_betas: tuple[float, float] = (0.9, 0.999)
    discrepancy: str = "gradient"
    strength: float = 10.0


class BatchSampler:
    """Seeded minibatch indices for one node (without replacement within a batch)."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, node: int) -> None:
        if num_examples < 1:
            raise ValueError(f"node {node} has no training examples")
        self.num_examples = num_examples
        self.batch_size = min(batch_size, num_examples)
        self.rng = np.random.default_rng([seed, node])

    def next(self) -> list[int]:
        return [int(i) for i in self.rng.choice(self.num_examples, self.batch_size, replace=False)]

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


class DecaNode:
    def __init__(
        self,
        model: nn.Module,
        blocks: list[Block],
        settings: AdamSettings,
        sampler: BatchSampler,
        make_batch: Callable[[list[int]], Any],
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        choco: ChocoSettings | None = None,
    ) -> None:
        self.model = model
        self.blocks = blocks
        self.settings = settings
        self.sampler = sampler
        self.make_batch = make_batch
        self.loss_fn = loss_fn
        self.active: ActiveBlock | None = None
        self.optimizer: BlockAdam | None = None
        self.peak_optimizer_bytes = 0  # grads + Adam moments (+ fp32 masters), measured
        self.choco = choco  # None: uncompressed gossip
        self.public: PublicCopies | None = None  # compressed gossip: the active block's public copies
        self.peak_public_bytes = 0  # the public copies, measured

    @property
    def active_index(self) -> int | None:
        return None if self.active is None else self.active.block.index

    def start_block(self, index: int) -> None:
        """Activate block `index` with fresh Adam moments (frees the previous block's state)."""
        if not 0 <= index < len(self.blocks):
            raise ValueError(f"block {index} outside 0..{len(self.blocks) - 1}")
        self.end_block()
        self.active = ActiveBlock(self.model, self.blocks[index])
        s = self.settings
        self.optimizer = BlockAdam(self.active.masters, lr=s.lr, betas=s.betas, eps=s.eps, bma=s.bma,
                                   bma_betas=s.bma_betas, discrepancy=s.discrepancy, strength=s.strength)
        if self.choco is not None:
            masters = self.active.masters
            self.public = PublicCopies(self.choco, self.active.block.param_names, [m.shape for m in masters],
                                       masters[0].device)

    def end_block(self) -> None:
        if self.active is not None:
            self.active.release()
        self.active, self.optimizer, self.public = None, None, None

    def local_step(self, *, copy: bool = True) -> tuple[float, dict[str, torch.Tensor]]:
        """One Adam step on the active block; returns the loss and the half-step block: a copy, or
        (copy=False, for a caller that serialises it right away) views that the next mix overwrites."""
        active, optimizer = self._require_active()
        loss = self.loss_fn(self.model, self.make_batch(self.sampler.next()))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} on block {active.block.name}")
        loss.backward()
        active.grads_to_master()
        grad_bytes = sum(m.grad.numel() * m.grad.element_size() for m in active.masters if m.grad is not None)
        optimizer.step()
        active.master_to_model()
        master_bytes = sum(m.numel() * m.element_size() for m in active.masters) if active.has_copy else 0
        self.peak_optimizer_bytes = max(self.peak_optimizer_bytes,
                                        grad_bytes + optimizer.optimizer_bytes() + master_bytes)
        half = active.values()
        return float(loss.detach()), {k: v.clone() for k, v in half.items()} if copy else half

    def block_values(self) -> dict[str, torch.Tensor]:
        return self._require_active()[0].values()

    def stored_block(self, index: int) -> dict[str, torch.Tensor]:
        """Current values of a block that is not being trained (views into the model)."""
        params = dict(self.model.named_parameters())
        return {name: params[name].detach() for name in self.blocks[index].param_names}

    def overwrite_block(self, index: int, values: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name in self.blocks[index].param_names:
                params[name].copy_(values[name])

    def apply_mix(self, self_weight: float, others: list[tuple[float, dict[str, torch.Tensor]]],
                  senders: list[str] | None = None, *, validated: bool = False) -> None:
        """theta = W_ii * own half + sum_j W_ij * half_j, after validating every neighbour block
        (`validated=True`: the caller already ran check_block on each, as the Flower mod does)."""
        active = self._require_active()[0]
        expected = active.values()
        for n, (_, block) in enumerate([] if validated else others):
            check_block(block, expected, senders[n] if senders else f"neighbour {n}")
        names = active.block.param_names
        sent = [expected[k] for k in names] if active.has_copy else None  # bf16: see core/gossip.py
        mixed = mix(active.masters, self_weight, [(w, [b[k] for k in names]) for w, b in others], sent)
        self.apply_mixed(mixed)

    def apply_mixed(self, mixed: list[torch.Tensor]) -> None:
        """Take an already mixed block (the reference's fast path) and fold BMA."""
        active, optimizer = self._require_active()
        optimizer.fold(mixed)
        active.master_to_model()

    def publish(self) -> dict[str, torch.Tensor]:
        """Compressed gossip, after local_step: the payload q = C(half - own public copy) for every
        neighbour (plain tensors, compression.py); the own copy takes q."""
        payload = self._require_public().publish(self._require_active()[0].masters)
        self.peak_public_bytes = max(self.peak_public_bytes, self.public.nbytes())
        return payload

    def receive(self, sender: str, payload: dict[str, torch.Tensor], max_deviation: float = 0.0) -> None:
        """Compressed gossip: add a neighbour's payload to its public copy, or raise BlockError
        naming `sender` (malformed payload; a copy that is not finite or, max_deviation > 0, too far
        from this node's block)."""
        public, masters = self._require_public(), self._require_active()[0].masters
        public.receive(sender, payload, {n: m.detach() for n, m in zip(public.shapes, masters)}, max_deviation)
        self.peak_public_bytes = max(self.peak_public_bytes, public.nbytes())

    def apply_public_mix(self, weights: dict[str, float]) -> None:
        """Compressed gossip: theta = half + gamma * sum_j W_ij (copy_j - own copy) over the senders
        in `weights` (the neighbours taking part), then the BMA fold of what was mixed."""
        self.apply_mixed(self._require_public().mixed(self._require_active()[0].masters, weights))

    def _require_public(self) -> PublicCopies:
        if self.public is None:
            raise RuntimeError("compressed gossip needs choco settings and an active block (start_block)")
        return self.public

    def _require_active(self) -> tuple[ActiveBlock, BlockAdam]:
        if self.active is None or self.optimizer is None:
            raise RuntimeError("no active block: call start_block first")
        return self.active, self.optimizer
