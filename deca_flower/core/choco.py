"""CHOCO-gossip (Koloskova, Stich, Jaggi 2019) on the active block: compressed gossip whose
compression error does not accumulate and which keeps the network average.

Node i keeps public copies x_hat of its own block and of each neighbour's: degree + 1 fp32
copies of the ACTIVE block, zero when the visit starts and dropped with it. Per inner step:

    half_i = Adam step on theta_i                          node.local_step()
    q_i    = C(half_i - x_hat_i);   x_hat_i += q_i         publish(): q_i goes to every neighbour
    x_hat_j += q_j                                         receive(): per neighbour, checked first
    theta_i = half_i + gamma * sum_j W_ij (x_hat_j - x_hat_i)      mixed() (from the second exchange
                                                                   of a visit on), then BMA folds theta_i

Every holder of x_hat_j starts from zero and adds the same decoded q_j (compression.py decodes
bit for bit alike everywhere), so all copies of x_hat_j are equal; with W symmetric the mix terms
cancel over the nodes and the average of theta is exactly what the Adam steps made it. What C
leaves out stays in half_i - x_hat_i and goes out with a later q_i (error feedback). Since copies
start at zero, a visit's first payload (seq 0) carries the block itself: it is int8 whatever the
codec of the later ones (codec_at), as int4 or top-k of the weights themselves leave copy errors
many times int8's (bench/compression_codecs.py; figures in bench/RESULTS.md).

The consensus step size gamma must shrink with the share of the change that C keeps (the paper's
gamma ~ delta): with gossip alone, int8 and int4 reach consensus at gamma = 1, top-k only at a
smaller gamma (bench/compression_codecs.py). default_gamma takes 2 x fraction for top-k.

The first exchange of a visit only fills the copies; nodes mix from the second on. Mixed in, the
int8 error of whole weights is disagreement far above what the Adam steps make; it fades within a
few steps either way, and not mixing keeps it out of BMA's moments (bench/compression_visit.py).
Top-k cannot keep the nodes together on a real model: it sends a tenth of the entries per step,
where that error and the Adam steps touch every entry. Its nodes drift apart within a visit, even
with the second payload in int8 as well, so the config refuses compression='topk'
(bench/compression_visit.py).

A neighbour whose payload was refused has a copy that misses that q_j for good: it stays out of
this node's mix until the next visit starts everyone's copies afresh. The sender is not told and
keeps mixing with this node, so the pair's terms W_ij (x_hat_j - x_hat_i) no longer cancel: the
network average is not kept for the rest of that visit (on-bad-block=exclude; uncompressed gossip
loses it for the one step).

    exercised by: pytest tests/test_choco.py tests/test_choco_reference.py
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from deca_flower.core.compression import Codec, add_block, check_payload, encode_block, payload_layout
from deca_flower.core.gossip import BlockError, check_block, public_mix


def default_gamma(codec: Codec) -> float:
    """The consensus step size that keeps gossip with this codec stable (module docstring)."""
    return min(1.0, 2 * codec.fraction) if codec.name == "topk" else 1.0


@dataclass(frozen=True)
class ChocoSettings:
    """The codec of the payloads after a visit's first, and the consensus step size gamma."""

    codec: Codec
    gamma: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.gamma <= 1:
            raise ValueError(f"consensus step size gamma must be in (0, 1], got {self.gamma}")

    def codec_at(self, seq: int) -> Codec:
        """The codec of payload number `seq` of a visit: int8 with the same chunk for the first."""
        return Codec("int8", self.codec.chunk) if seq == 0 else self.codec


class PublicCopies:
    """x_hat of one node's active block and of its neighbours' (keyed by sender name)."""

    def __init__(self, settings: ChocoSettings, names: Sequence[str], shapes: Sequence[torch.Size],
                 device: torch.device) -> None:
        self.settings = settings
        self.shapes = dict(zip(names, (tuple(s) for s in shapes)))
        self.device = device
        self.own: list[torch.Tensor] = []          # allocated at the first publish
        self.copies: dict[str, list[torch.Tensor]] = {}
        self.sent = 0                              # payloads published this visit
        self.received: dict[str, int] = {}         # payloads taken per neighbour
        self.out_of_sync: set[str] = set()         # neighbours whose copy missed a payload

    def layout(self, seq: int) -> dict[str, tuple[torch.dtype, int]]:
        """Key -> (dtype, elements) of payload number `seq` of this block, in the order encode_block makes them."""
        return payload_layout(self.settings.codec_at(seq), self.shapes)

    def publish(self, values: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """q = C(values - x_hat_own) as a payload; x_hat_own += q (decoded, as every receiver does)."""
        if not self.own:
            self.own = self._zeros()
        codec = self.settings.codec_at(self.sent)
        with torch.no_grad():
            differences = ((n, v.float() - c) for n, v, c in zip(self.shapes, values, self.own))
            payload = encode_block(codec, differences, self.sent)
            add_block(codec, dict(zip(self.shapes, self.own)), payload)
        self.sent += 1
        return payload

    def receive(self, sender: str, payload: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor] | None = None,
                max_deviation: float = 0.0) -> None:
        """x_hat_sender += q, after check_payload; with `own` (this node's fp32 block) the updated
        copy must be finite and, with max_deviation > 0, that close to it (gossip.check_block).
        A refused payload leaves the sender out of sync (and out of the mix) for the rest of the visit."""
        self.require_in_sync(sender)
        seq = self.received.get(sender, 0)
        codec = self.settings.codec_at(seq)
        try:
            check_payload(payload, codec, self.shapes, seq, sender)
            copy = self.copies.get(sender) or self._zeros()
            add_block(codec, dict(zip(self.shapes, copy)), {k: v.to(self.device) for k, v in payload.items()})
            if own is not None:
                check_block(dict(zip(self.shapes, copy)), own, sender, max_deviation)
        except BlockError:
            self.refused(sender)
            raise
        self.copies[sender] = copy
        self.received[sender] = seq + 1

    def require_in_sync(self, sender: str) -> None:
        """Raise BlockError if a payload of `sender` was refused earlier in this visit."""
        if sender in self.out_of_sync:
            raise BlockError(f"{sender}'s public copy missed a payload earlier in this visit; it stays out of the "
                             "mix until the next block")

    def refused(self, sender: str) -> None:
        """A payload of `sender` was refused (here, or before it reached receive): its copy missed
        it, so the sender stays out of the mix for the rest of the visit."""
        self.forget(sender)
        self.out_of_sync.add(sender)

    def forget(self, sender: str) -> None:
        """Drop a neighbour's copy and its payload count (refused() does; a caller may for a neighbour
        that left the graph, else its copy stays allocated until the visit ends)."""
        self.copies.pop(sender, None)
        self.received.pop(sender, None)

    def mixed(self, half: Sequence[torch.Tensor], weights: Mapping[str, float]) -> list[torch.Tensor]:
        """mixed_with the copies of the neighbours in `weights`, each of which must have delivered
        as many payloads as this node published."""
        if not self.sent:
            raise ValueError("cannot mix before publishing: call publish() after the local step")
        for sender in weights:  # (a forgotten copy counts 0 payloads)
            if self.received.get(sender, 0) != self.sent:
                raise ValueError(f"cannot mix {sender}: its copy has {self.received.get(sender, 0)} payloads, "
                                 f"this node published {self.sent}")
        return self.mixed_with(half, [(w, self.copies[s]) for s, w in weights.items()])

    def mixed_with(self, half: Sequence[torch.Tensor], others: list[tuple[float, list[torch.Tensor]]]) -> list[torch.Tensor]:
        """half + gamma * sum_j W_ij (x_hat_j - x_hat_own) over (W_ij, x_hat_j) in `others`; after a
        visit's first exchange, which only fills the copies, half itself."""
        if self.sent == 1:
            return [t.detach().float().clone() for t in half]
        return public_mix(list(half), self.own, self.settings.gamma, others)

    def _zeros(self) -> list[torch.Tensor]:
        return [torch.zeros(s, dtype=torch.float32, device=self.device) for s in self.shapes.values()]

    def nbytes(self) -> int:
        """Bytes held by the copies now."""
        return sum(t.numel() * t.element_size() for copy in (self.own, *self.copies.values()) for t in copy)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume mid-visit (see load_state_tensors)."""
        out = {"sent": torch.tensor(self.sent)}
        out.update({f"own.{k}": t for k, t in enumerate(self.own)})
        for sender, copy in self.copies.items():
            out[f"received.{sender}"] = torch.tensor(self.received[sender])
            out.update({f"copy.{k}.{sender}": t for k, t in enumerate(copy)})
        out.update({f"out_of_sync.{sender}": torch.tensor(1) for sender in self.out_of_sync})
        return out

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Inverse of state_tensors (a node restoring from disk in another process)."""
        count = len(self.shapes)
        self.sent = int(tensors["sent"])
        self.own = [tensors[f"own.{k}"].to(self.device).clone() for k in range(count)] if "own.0" in tensors else []
        senders = [key.split(".", 1)[1] for key in tensors if key.startswith("received.")]
        self.received = {s: int(tensors[f"received.{s}"]) for s in senders}
        self.copies = {s: [tensors[f"copy.{k}.{s}"].to(self.device).clone() for k in range(count)] for s in senders}
        self.out_of_sync = {key.split(".", 1)[1] for key in tensors if key.startswith("out_of_sync.")}
