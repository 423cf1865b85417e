"""The nodes' side of packing.py: a block of torch tensors <-> one packed ArrayRecord, bit-exact
in its own dtype (bf16 included); a compressed payload (core/compression.py) likewise."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from flwr.app import ArrayRecord

from deca_flower.core.compression import Codec, payload_layout
from deca_flower.protocol.packing import COMPRESSED, PACKED, WIRE_DTYPES, RecordError, pack, packed_size, unpack

_WIRE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int8: "int8",
         torch.uint8: "uint8", torch.int32: "int32", torch.int64: "int64"}
_FROM_WIRE = {name: dtype for dtype, name in _WIRE.items()}


def block_to_record(block: Mapping[str, torch.Tensor], stype: str = PACKED) -> ArrayRecord:
    """A block (stype PACKED) or a compressed payload (COMPRESSED) as one packed ArrayRecord."""
    tensors = []
    for name, tensor in block.items():
        if _WIRE.get(tensor.dtype) not in WIRE_DTYPES[stype]:
            raise RecordError(f"cannot send '{name}' of dtype {tensor.dtype} in a {stype} record")
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        tensors.append((name, _WIRE[tensor.dtype], tuple(tensor.shape), raw))
    return pack(tensors, stype)


def wire_bytes(block: dict[str, torch.Tensor]) -> int:
    """Bytes of block_to_record(block), as the relay counts them (packing.record_bytes), without packing it."""
    return packed_size([(name, _WIRE[t.dtype], tuple(t.shape)) for name, t in block.items()])


def payload_wire_bytes(codec: Codec, shapes: Mapping[str, Sequence[int]]) -> int:
    """Bytes of the record of a compressed payload of a block of `shapes`, without encoding it."""
    return packed_size([(key, _WIRE[dtype], (count,)) for key, (dtype, count) in payload_layout(codec, shapes).items()])


def record_to_block(record: ArrayRecord, sender: str, stype: str = PACKED) -> dict[str, torch.Tensor]:
    """Decode without trusting the sender (packing.unpack checks it). The tensors are read-only
    views of the record's bytes (no copy: a neighbour block is only validated and mixed); a caller
    that keeps or changes one copies it."""
    out = {}
    with warnings.catch_warnings():  # torch warns that the bytes are not writable: they need not be
        warnings.simplefilter("ignore", UserWarning)
        for tensor in unpack(record, sender, stype):
            dtype = _FROM_WIRE[tensor.dtype]
            values = torch.frombuffer(tensor.data, dtype=dtype) if tensor.numel else torch.empty(0, dtype=dtype)
            out[tensor.name] = values.reshape(tensor.shape)
    return out


def payload_to_record(payload: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return block_to_record(payload, COMPRESSED)


def record_to_payload(record: ArrayRecord, sender: str) -> dict[str, torch.Tensor]:
    """A neighbour's compressed payload as views of the record's bytes; its header and part sizes
    are for compression.check_payload to check before anything is decoded."""
    return record_to_block(record, sender, COMPRESSED)
