"""Record keys (defined once) and the block <-> ArrayRecord conversion.

Blocks travel bit-exact in their own dtype, packed into ONE `Array` (stype "deca-packed-v1"):
an 8-byte manifest length, the JSON manifest [[name, dtype, shape], ...], then every tensor's
raw bytes back to back, each at an 8-byte aligned offset. One array instead of one per tensor,
because Flower moves every Array (and each 5 MB chunk of it) as its own object, one HTTP request
per object per hop in deployment: a SmolLM2 block of 6 layers was ~110 objects, now ~18. bf16
has no numpy dtype; its bytes are sent as they are and reinterpreted on arrival (no upcast).
The payload is the packed buffer itself (a numpy view, not a `bytes` copy of it): Flower slices
it through a memoryview in deployment, and numpy arrays pickle out of band (PEP 574), so the
simulation engine's Ray object store moves them without copying them into and out of a pickle.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import warnings
from collections import Counter

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from deca_flower.core.reference import consensus_distance

log = logging.getLogger(__name__)

# message types
QUERY = "query.deca"
TRAIN = "train.deca"
EVALUATE = "evaluate.deca"

# record names
CONFIG = "deca.config"            # ConfigRecord: the run config (hyphenated keys)
INSTRUCTION = "deca.instruction"  # ConfigRecord: what this message asks the node to do
WEIGHTS = "deca.weights"          # ConfigRecord: mixing weight per neighbour partition id (+ "self")
NEIGHBOUR_PREFIX = "deca.nbr."    # ArrayRecord per neighbour: "deca.nbr.<partition id>"
HALF = "deca.half"                # ArrayRecord: the node's half-step block (reply)
NODE_INFO = "deca.node"           # ConfigRecord: partition id, device, sizes (query reply)
METRICS = "deca.metrics"          # MetricRecord: losses, timings, accuracy
KEYS = "deca.keys"                # ConfigRecord: neighbours' signed X25519 keys ("pub.<id>", "sig.<id>")
SEALED_PREFIX = "deca.sealed."    # ArrayRecord per receiver: the half-step block encrypted for it
SECURE_STATE = "deca.secure"      # context.state: the node's per-run X25519 key (stays on the node)
EXCLUDED = "deca.excluded"        # ConfigRecord: neighbour blocks a node refused this step, and why
SAMPLES = "deca.samples"          # evaluate: generate answers (instruction), and the answers (reply)
BLOCKS = "deca.blocks"            # ArrayRecord: whole blocks for a node that rejoins (from a neighbour)

# instruction keys
STEP = "step"          # global inner-step counter of the run
MIX = "mix"            # mix the previous step's halves first
BLOCK = "block"        # block to run a local step on (-1: none)
START = "start"        # first step of a block visit: fresh Adam moments
VISIT = "visit"        # rejoin: the visit after which the node takes part again
FINISH = "finish"      # after mixing, finish the active block and save it as this visit (-1: no)
FRESH = "fresh-start"          # query: a new run; delete checkpoints of an earlier attempt
RESUME_VISIT = "resume-visit"  # query: continue from this node's checkpoint of that visit
SEND_BLOCKS = "send-blocks"    # query: reply with the current values of these blocks

PACKED = "deca-packed-v1"  # Array stype of a packed block
PACKED_KEY = "block"      # its key in the ArrayRecord
_ALIGN = 8
_LENGTH = struct.Struct("<Q")
_WIRE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_FROM_NAME = {name: dtype for dtype, name in _WIRE.items()}


class RecordError(ValueError):
    """A received record is malformed (unknown dtype, size mismatch, missing entry)."""


def _layout(manifest_bytes: int, entries: list) -> tuple[list[int], list[int], int]:
    """Byte offset and size of every tensor after the manifest, and the total length."""
    offsets, sizes, end = [], [], _LENGTH.size + manifest_bytes
    for _, wire_name, shape in entries:
        end = -(-end // _ALIGN) * _ALIGN
        size = math.prod(shape) * _FROM_NAME[wire_name].itemsize  # Python ints: a hostile shape cannot overflow
        offsets.append(end)
        sizes.append(size)
        end += size
    return offsets, sizes, end


def block_to_record(block: dict[str, torch.Tensor]) -> ArrayRecord:
    entries = []
    for name, tensor in block.items():
        if tensor.dtype not in _WIRE:
            raise RecordError(f"cannot send '{name}' of dtype {tensor.dtype}")
        entries.append([name, _WIRE[tensor.dtype], list(tensor.shape)])
    manifest = json.dumps(entries).encode()
    offsets, sizes, total = _layout(len(manifest), entries)
    packed = torch.zeros(total, dtype=torch.uint8)  # zeros: the padding, hence the object ids, are deterministic
    packed[:_LENGTH.size] = torch.frombuffer(bytearray(_LENGTH.pack(len(manifest))), dtype=torch.uint8)
    packed[_LENGTH.size:_LENGTH.size + len(manifest)] = torch.frombuffer(bytearray(manifest), dtype=torch.uint8)
    for tensor, offset, size in zip(block.values(), offsets, sizes):
        packed[offset:offset + size] = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    array = Array(dtype="uint8", shape=(total,), stype=PACKED, data=b"")
    array.data = packed.numpy()  # the buffer itself, not a bytes copy of it: ~0.1 s less per 80 MB block
    record = ArrayRecord()  # not ArrayRecord({...}): that re-creates the Array, and only from bytes
    record[PACKED_KEY] = array
    return record


def _manifest(data: memoryview, sender: str) -> list:
    if len(data) < _LENGTH.size:
        raise RecordError(f"block from {sender}: {len(data)} bytes, too short for a packed block")
    (length,) = _LENGTH.unpack_from(data)
    if _LENGTH.size + length > len(data):
        raise RecordError(f"block from {sender}: manifest of {length} bytes in a {len(data)}-byte block")
    try:
        entries = json.loads(bytes(data[_LENGTH.size:_LENGTH.size + length]))
    except ValueError as err:
        raise RecordError(f"block from {sender}: unreadable manifest ({err})") from None
    well_formed = isinstance(entries, list) and all(
        isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and e[1] in _FROM_NAME
        and isinstance(e[2], list) and all(isinstance(d, int) and d >= 0 for d in e[2]) for e in entries)
    if not well_formed:
        raise RecordError(f"block from {sender}: manifest is not [[name, float32|float16|bfloat16, shape], ...]")
    return entries


def record_to_block(record: ArrayRecord, sender: str) -> dict[str, torch.Tensor]:
    """Decode without trusting the sender: layout, dtypes and byte count are checked.

    The tensors are read-only views of the record's bytes (no copy: a neighbour block is only
    validated and mixed); a caller that keeps or changes one copies it."""
    if list(record) != [PACKED_KEY] or record[PACKED_KEY].stype != PACKED:
        raise RecordError(f"block from {sender}: expected one '{PACKED_KEY}' array of stype {PACKED}, "
                          f"got {[(k, a.stype) for k, a in record.items()]}")
    data = memoryview(record[PACKED_KEY].data).cast("B")  # bytes from Flower's objects, else a numpy view
    entries = _manifest(data, sender)
    offsets, sizes, total = _layout(_LENGTH.unpack_from(data)[0], entries)
    if total != len(data):
        raise RecordError(f"block from {sender}: {len(data)} bytes, its manifest describes {total}")
    out = {}
    with warnings.catch_warnings():  # torch warns that the bytes are not writable: they need not be
        warnings.simplefilter("ignore", UserWarning)
        for (name, wire_name, shape), offset, size in zip(entries, offsets, sizes):
            dtype = _FROM_NAME[wire_name]
            count = size // dtype.itemsize
            tensor = torch.frombuffer(data, dtype=dtype, count=count, offset=offset) if count else torch.empty(0, dtype=dtype)
            out[name] = tensor.reshape(shape)
    if len(out) != len(entries):
        raise RecordError(f"block from {sender}: a tensor name appears twice in the manifest")
    return out


def consensus_distance_of(halves: dict[int, ArrayRecord]) -> float:
    """core.reference.consensus_distance of relayed halves (partition id -> record). A measurement,
    so a half that does not decode or does not match the others' tensors (one the nodes excluded,
    with on-bad-block=exclude) is left out, with a warning, instead of stopping the run."""
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for pid, half in halves.items():
        try:
            blocks[pid] = record_to_block(half, f"node {pid}")
        except RecordError as err:
            log.warning("consensus distance: %s; left out", err)
    layouts = Counter(_layout_of(block) for block in blocks.values())
    if not layouts:
        return float("nan")
    common = layouts.most_common(1)[0][0]
    for pid in [pid for pid, block in blocks.items() if _layout_of(block) != common]:
        log.warning("consensus distance: node %d's half has other tensors than its neighbours'; left out", pid)
        del blocks[pid]
    return consensus_distance(list(blocks.values()))


def _layout_of(block: dict[str, torch.Tensor]) -> tuple:
    return tuple((name, tuple(t.shape), t.dtype) for name, t in block.items())


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes, from the arrays' shapes (a relayed array's data is not on the ServerApp)."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in record.values())
