"""A block of named tensors packed bit-exact into ONE Flower `Array` (stype "deca-packed-v1").

Layout: an 8-byte manifest length, the JSON manifest [[name, dtype, shape], ...], then every
tensor's raw bytes back to back, each at an 8-byte aligned offset. A compressed payload (stype
"deca-compressed-v1": headers, scales, quantised values or top-k indices) is packed the same way,
with integer dtypes its manifest may name and a block's may not. One array instead of one per
tensor, because Flower moves every Array (and each 5 MB chunk of it) as its own object, one HTTP
request per object per hop in deployment: a SmolLM2 block of 6 layers is ~18 objects packed, ~110
as one Array per tensor.
bf16 has no numpy dtype; its bytes are sent as they are and reinterpreted on arrival (no upcast).
The payload is the packed buffer itself (a numpy array, not a `bytes` copy of it): Flower slices
it through a memoryview in deployment, and numpy arrays pickle out of band (PEP 574), so the
simulation engine's Ray object store moves them without copying them into and out of a pickle.

numpy only: the coordinator (ServerApp) reads blocks here without torch; tensors.py is the nodes' side.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections import Counter
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

log = logging.getLogger(__name__)

PACKED = "deca-packed-v1"  # Array stype of a packed block
COMPRESSED = "deca-compressed-v1"  # ... of a compressed payload (core/compression.py): the same layout, integer parts
PACKED_KEY = "block"      # its key in the ArrayRecord
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}  # the wire dtypes of a block
PAYLOAD_ITEMSIZE = {"float32": 4, "int8": 1, "uint8": 1, "int32": 4, "int64": 8}  # ... of a compressed payload
WIRE_DTYPES = {PACKED: ITEMSIZE, COMPRESSED: PAYLOAD_ITEMSIZE}  # stype -> the dtypes its manifest may name
_ITEMSIZE = ITEMSIZE | PAYLOAD_ITEMSIZE
FLOAT64_SLICE = 1 << 20  # elements per float64 slice of the consensus distance: bounded scratch memory
MAX_MANIFEST_BYTES = 1 << 20  # ~10,000 tensors' names and shapes: far above any model's block
MAX_DIMS = 8
_ALIGN = 8
_LENGTH = struct.Struct("<Q")


class RecordError(ValueError):
    """A received record is malformed (unknown dtype, size mismatch, missing entry)."""


@dataclass(frozen=True)
class PackedTensor:
    """One tensor of a packed block: its wire dtype, shape and raw (little-endian) bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    def as_float64(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Elements [start, stop) in float64 (bf16: its 16 bits are the top half of a float32)."""
        size = ITEMSIZE[self.dtype]
        raw = self.data[start * size: None if stop is None else stop * size]
        if self.dtype == "bfloat16":
            return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return np.frombuffer(raw, dtype="<f4" if self.dtype == "float32" else "<f2").astype(np.float64)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _layout(manifest_bytes: int, entries: list) -> tuple[list[int], list[int], int]:
    """Byte offset and size of every tensor after the manifest, and the total length."""
    offsets, sizes, end = [], [], _LENGTH.size + manifest_bytes
    for _, dtype, shape in entries:
        end = -(-end // _ALIGN) * _ALIGN
        size = math.prod(shape) * _ITEMSIZE[dtype]  # Python ints: a hostile shape cannot overflow
        offsets.append(end)
        sizes.append(size)
        end += size
    return offsets, sizes, end


def packed_size(tensors: list[tuple[str, str, tuple[int, ...]]]) -> int:
    """Bytes of the Array `pack` makes of tensors (name, wire dtype, shape), without making it."""
    entries = [[name, dtype, list(shape)] for name, dtype, shape in tensors]
    return _layout(len(json.dumps(entries).encode()), entries)[2]


def pack(tensors: list[tuple[str, str, tuple[int, ...], np.ndarray]], stype: str = PACKED) -> ArrayRecord:
    """(name, wire dtype, shape, raw bytes as a flat uint8 array) per tensor -> one packed Array of
    `stype` (PACKED: a block; COMPRESSED: a compressed payload)."""
    entries = [[name, dtype, list(shape)] for name, dtype, shape, _ in tensors]
    manifest = json.dumps(entries).encode()
    offsets, sizes, total = _layout(len(manifest), entries)
    packed = np.zeros(total, dtype=np.uint8)  # zeros: the padding, hence the object ids, are deterministic
    packed[:_LENGTH.size] = np.frombuffer(_LENGTH.pack(len(manifest)), dtype=np.uint8)
    packed[_LENGTH.size:_LENGTH.size + len(manifest)] = np.frombuffer(manifest, dtype=np.uint8)
    for (name, _, _, raw), offset, size in zip(tensors, offsets, sizes):
        if raw.nbytes != size:
            raise RecordError(f"'{name}': {raw.nbytes} bytes for {size} expected")
        packed[offset:offset + size] = raw
    array = Array(dtype="uint8", shape=(total,), stype=stype, data=b"")
    array.data = packed  # the buffer itself, not a bytes copy of it: ~0.1 s less per 80 MB block
    record = ArrayRecord()  # not ArrayRecord({...}): that re-creates the Array, and only from bytes
    record[PACKED_KEY] = array
    return record


def _manifest(data: memoryview, sender: str, stype: str) -> list:
    """The manifest, bounded before it is parsed (its length) and before anything is allocated for
    it (every dimension at most the block's byte count, so no shape can overflow a tensor's size)."""
    if len(data) < _LENGTH.size:
        raise RecordError(f"block from {sender}: {len(data)} bytes, too short for a packed block")
    (length,) = _LENGTH.unpack_from(data)
    if _LENGTH.size + length > len(data) or length > MAX_MANIFEST_BYTES:
        raise RecordError(f"block from {sender}: manifest of {length} bytes in a {len(data)}-byte block "
                          f"(at most {MAX_MANIFEST_BYTES})")
    try:
        entries = json.loads(bytes(data[_LENGTH.size:_LENGTH.size + length]))
    except (ValueError, RecursionError) as err:  # RecursionError: nesting too deep for the parser
        raise RecordError(f"block from {sender}: unreadable manifest ({type(err).__name__})") from None
    well_formed = isinstance(entries, list) and all(
        isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and e[1] in WIRE_DTYPES[stype]
        and isinstance(e[2], list) and len(e[2]) <= MAX_DIMS
        and all(type(d) is int and 0 <= d <= len(data) for d in e[2]) for e in entries)  # (type: not bool)
    if not well_formed:
        raise RecordError(f"block from {sender}: manifest is not [[name, {'|'.join(WIRE_DTYPES[stype])}, shape], ...] "
                          f"with at most {MAX_DIMS} dimensions, each in 0..{len(data)}")
    return entries


def unpack(record: ArrayRecord, sender: str, stype: str = PACKED) -> list[PackedTensor]:
    """Decode without trusting the sender: stype, layout, dtypes, names and byte count are checked.
    The tensors' bytes are views of the record's (no copy)."""
    if list(record) != [PACKED_KEY] or record[PACKED_KEY].stype != stype:
        raise RecordError(f"block from {sender}: expected one '{PACKED_KEY}' array of stype {stype}, "
                          f"got {[(k, a.stype) for k, a in record.items()]}")
    data = memoryview(record[PACKED_KEY].data).cast("B")  # bytes from Flower's objects, else a numpy view
    entries = _manifest(data, sender, stype)
    offsets, sizes, total = _layout(_LENGTH.unpack_from(data)[0], entries)
    if total != len(data):
        raise RecordError(f"block from {sender}: {len(data)} bytes, its manifest describes {total}")
    if len({name for name, _, _ in entries}) != len(entries):
        raise RecordError(f"block from {sender}: a tensor name appears twice in the manifest")
    return [PackedTensor(name, dtype, tuple(shape), data[offset:offset + size])
            for (name, dtype, shape), offset, size in zip(entries, offsets, sizes)]


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes, from the arrays' shapes (a relayed array's data is not on the ServerApp)."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in record.values())


def consensus_distance(halves: dict[int, ArrayRecord]) -> float:
    """Mean over nodes of ||x_i - mean x||^2 of relayed halves (partition id -> record), in float64
    (the nodes agree to a few digits, so float32 would measure rounding), FLOAT64_SLICE elements
    at a time. A measurement: a half that does not decode or has other tensors than most (one the
    nodes excluded, with on-bad-block=exclude) is left out with a warning instead of stopping the run."""
    blocks: dict[int, list[PackedTensor]] = {}
    for pid, half in halves.items():
        try:
            blocks[pid] = unpack(half, f"node {pid}")
        except RecordError as err:
            log.warning("consensus distance: %s; left out", err)
    layouts = Counter(_layout_of(block) for block in blocks.values())
    if not layouts:
        return float("nan")
    common = layouts.most_common(1)[0][0]
    for pid in [pid for pid, block in blocks.items() if _layout_of(block) != common]:
        log.warning("consensus distance: node %d's half has other tensors than its neighbours'; left out", pid)
        del blocks[pid]
    nodes = list(blocks.values())
    total = 0.0
    for index, tensor in enumerate(nodes[0]):
        for start in range(0, tensor.numel, FLOAT64_SLICE):
            parts = [node[index].as_float64(start, start + FLOAT64_SLICE) for node in nodes]
            mean = np.sum(parts, axis=0) / len(parts)
            total += sum(float(np.dot(part - mean, part - mean)) for part in parts)
    return total / len(nodes)


def _layout_of(block: list[PackedTensor]) -> tuple:
    return tuple((t.name, t.shape, t.dtype) for t in block)
