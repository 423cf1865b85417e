"""The nodes' side of packing.py: a block of torch tensors <-> one packed ArrayRecord, bit-exact
in its own dtype (bf16 included)."""

from __future__ import annotations

import warnings

import torch
from flwr.app import ArrayRecord

from deca_flower.protocol.packing import RecordError, pack, packed_size, unpack

_WIRE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_FROM_WIRE = {name: dtype for dtype, name in _WIRE.items()}


def block_to_record(block: dict[str, torch.Tensor]) -> ArrayRecord:
    tensors = []
    for name, tensor in block.items():
        if tensor.dtype not in _WIRE:
            raise RecordError(f"cannot send '{name}' of dtype {tensor.dtype}")
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        tensors.append((name, _WIRE[tensor.dtype], tuple(tensor.shape), raw))
    return pack(tensors)


def wire_bytes(block: dict[str, torch.Tensor]) -> int:
    """Bytes of block_to_record(block), as the relay counts them (packing.record_bytes), without packing it."""
    return packed_size([(name, _WIRE[t.dtype], tuple(t.shape)) for name, t in block.items()])


def record_to_block(record: ArrayRecord, sender: str) -> dict[str, torch.Tensor]:
    """Decode without trusting the sender (packing.unpack checks it). The tensors are read-only
    views of the record's bytes (no copy: a neighbour block is only validated and mixed); a caller
    that keeps or changes one copies it."""
    out = {}
    with warnings.catch_warnings():  # torch warns that the bytes are not writable: they need not be
        warnings.simplefilter("ignore", UserWarning)
        for tensor in unpack(record, sender):
            dtype = _FROM_WIRE[tensor.dtype]
            values = torch.frombuffer(tensor.data, dtype=dtype) if tensor.numel else torch.empty(0, dtype=dtype)
            out[tensor.name] = values.reshape(tensor.shape)
    return out
