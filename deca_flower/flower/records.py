"""Record keys (defined once) and the block <-> ArrayRecord conversion.

Blocks travel bit-exact in their own dtype: the raw bytes of each tensor in an `Array` with
stype "raw" and the torch dtype name; bf16 has no numpy dtype, so its bytes are read as int16
and reinterpreted on arrival (no upcast, no extra bytes).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

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

STYPE = "raw"
_WIRE = {torch.float32: ("float32", np.float32), torch.float16: ("float16", np.float16),
         torch.bfloat16: ("bfloat16", np.int16)}
_FROM_NAME = {name: (dtype, np_dtype) for dtype, (name, np_dtype) in _WIRE.items()}
_NUMPY_TO_TORCH = {np.float32: torch.float32, np.float16: torch.float16, np.int16: torch.int16}


class RecordError(ValueError):
    """A received record is malformed (unknown dtype, size mismatch, missing entry)."""


def block_to_record(block: dict[str, torch.Tensor]) -> ArrayRecord:
    record = ArrayRecord()
    for name, tensor in block.items():
        if tensor.dtype not in _WIRE:
            raise RecordError(f"cannot send '{name}' of dtype {tensor.dtype}")
        wire_name, np_dtype = _WIRE[tensor.dtype]
        raw = tensor.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:
            raw = raw.view(torch.int16)
        record[name] = Array(dtype=wire_name, shape=tuple(tensor.shape), stype=STYPE,
                             data=raw.numpy().astype(np_dtype, copy=False).tobytes())
    return record


def record_to_block(record: ArrayRecord, sender: str) -> dict[str, torch.Tensor]:
    """Decode without trusting the sender: dtype, stype and byte count are checked.

    The tensors are read-only views of the record's bytes (no copy: a neighbour block is only
    validated and mixed); a caller that keeps or changes one copies it."""
    out = {}
    for name, array in record.items():
        if array.stype != STYPE or array.dtype not in _FROM_NAME:
            raise RecordError(f"block from {sender}: '{name}' has stype/dtype {array.stype}/{array.dtype}")
        dtype, np_dtype = _FROM_NAME[array.dtype]
        count = int(np.prod(array.shape)) if array.shape else 1
        if len(array.data) != count * np.dtype(np_dtype).itemsize:
            raise RecordError(f"block from {sender}: '{name}' has {len(array.data)} bytes for shape {array.shape}")
        with warnings.catch_warnings():  # torch warns that the bytes are not writable: they need not be
            warnings.simplefilter("ignore", UserWarning)
            wire = _NUMPY_TO_TORCH[np_dtype]
            tensor = torch.frombuffer(array.data, dtype=wire) if count else torch.empty(0, dtype=wire)
        tensor = tensor.reshape(array.shape)
        out[name] = tensor.view(dtype) if dtype == torch.bfloat16 else tensor
    return out


def record_bytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())
