"""What a node sends each inner step and what it takes from its neighbours' messages.

    uncompressed      its half-step block, packed (protocol/tensors.py)
    compressed        the payload C(half - own public copy) of core/choco.py, packed as plain
                      arrays (headers, scales, quantised values or top-k indices)
    secure gossip     either, its tensors sealed once per neighbour: compress, then seal

Nothing taken is used before it is checked: the record's layout and byte count (or the sealed
size) before anything is allocated from it, a compressed payload's headers and part sizes against
what this node's own block predicts before it is decoded (compression.check_payload), then the
values. Errors name the sender (BlockError, RecordError, SecurityError); the caller applies the
on-bad-block policy.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord

from deca_flower.core.compression import layout_bytes
from deca_flower.core.gossip import check_block
from deca_flower.core.node import DecaNode
from deca_flower.protocol import messages as pm
from deca_flower.protocol.packing import RecordError
from deca_flower.protocol.tensors import (
    block_to_record,
    payload_to_record,
    payload_wire_bytes,
    record_to_block,
    record_to_payload,
    wire_bytes,
)
from deca_flower.runtime import NodeRuntime
from deca_flower.secure import SEAL_OVERHEAD, PairwiseChannel, SecurityError

SEALED_KEY = "ct"  # the one array of a sealed half or payload


def outgoing(node: DecaNode, half: dict[str, torch.Tensor], channel: PairwiseChannel | None, receivers: list[int],
             step: int) -> tuple[ArrayRecord | None, dict[int, ArrayRecord]]:
    """After the local step: (the record every neighbour gets, or None) and (receiver -> its sealed
    record, with secure gossip). Compressed gossip publishes here: the own public copy takes q."""
    tensors = half if node.public is None else node.publish()  # a payload: in its layout's order (encode_block)
    if channel is None:
        return (block_to_record(tensors) if node.public is None else payload_to_record(tensors)), {}
    sealed = {}
    for pid in receivers:
        ciphertext = channel.seal(pid, step, node.active_index, list(tensors.values()))
        sealed[pid] = ArrayRecord({SEALED_KEY: Array(dtype="uint8", shape=(len(ciphertext),), stype="sealed",
                                                     data=ciphertext)})
    return None, sealed


def take(ask: pm.TrainStep, runtime: NodeRuntime, pid: int, record: ArrayRecord,
         own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Neighbour `pid`'s record of the previous step, checked: its half-step block (uncompressed), or
    None once its compressed payload is in its public copy."""
    node, cfg, sender = runtime.node, runtime.cfg, f"node {pid}"
    if node.public is None:
        block = dict(zip(own, _opened(ask, runtime, pid, record, list(own.values())))) if cfg.secure_gossip \
            else record_to_block(record, sender)
        check_block(block, own, sender, cfg.max_block_deviation)
        return block
    node.public.require_in_sync(sender)  # (before opening: its payload numbers are not this node's to guess)
    try:
        if cfg.secure_gossip:  # the layout of the payload due from it: sizes known before opening
            layout = node.public.layout(node.public.received.get(sender, 0))
            like = [torch.empty(count, dtype=dtype, device="meta") for dtype, count in layout.values()]
            payload = dict(zip(layout, _opened(ask, runtime, pid, record, like)))
        else:
            payload = record_to_payload(record, sender)
    except (RecordError, SecurityError):
        node.public.refused(sender)
        raise
    node.receive(sender, payload, cfg.max_block_deviation)
    return None


def _opened(ask: pm.TrainStep, runtime: NodeRuntime, sender_pid: int, record: ArrayRecord,
            like: list[torch.Tensor]) -> list[torch.Tensor]:
    if list(record) != [SEALED_KEY]:
        raise RecordError(f"block from node {sender_pid}: expected one '{SEALED_KEY}' array (secure-gossip), "
                          f"got {list(record)[:3]}")
    # sealed at the previous step, on the block that is still active here
    return runtime.channel.open(sender_pid, ask.step - 1, runtime.node.active_index, record[SEALED_KEY].data, like)


def half_bytes(runtime: NodeRuntime, *, first: bool) -> list[int]:
    """Per block, the bytes of what this node sends at a visit's first step (`first`) or later ones,
    as the relay counts them: the packed record, or one sealed copy. The relay lets through nothing
    of another size. Compressed, a visit's first payload is int8 (choco.ChocoSettings.codec_at)."""
    node, out = runtime.node, []
    for block in node.blocks:
        stored = node.stored_block(block.index)
        if node.choco is None:
            raw, packed = sum(t.numel() * t.element_size() for t in stored.values()), wire_bytes(stored)
        else:
            codec, shapes = node.choco.codec_at(0 if first else 1), {n: tuple(t.shape) for n, t in stored.items()}
            raw, packed = layout_bytes(codec, shapes), payload_wire_bytes(codec, shapes)
        out.append(raw + SEAL_OVERHEAD if runtime.cfg.secure_gossip else packed)
    return out
