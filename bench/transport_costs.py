"""Per node-step costs outside the forward/backward/Adam, before/after this code's fast paths
(SmolLM2-135M, 6 layers per block = the bench/overhead.py config, 2 neighbours).

    python bench/transport_costs.py

1. Decoding a neighbour block from its record: a copy of the bytes (before) versus a read-only
   view of them (protocol/tensors.py: the block is only validated and mixed).
2. What Flower's Ray backend adds: pickling the train message (two neighbour blocks) into the
   actor and the reply (one block) back, as ray.cloudpickle does (protocol 5), with the block
   bytes inside the pickle (plain `bytes`, before) versus out of band (protocol/packing.py's payload,
   after): Ray then copies each buffer once into its shared-memory object store (emulated here
   by one copy) and the receiver reads it in place.
"""

from __future__ import annotations

import pickle
import platform
import sys
from pathlib import Path

import ray.cloudpickle as cloudpickle
import torch
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

from deca_flower.config import DecaConfig
from deca_flower.protocol import messages as pm
from deca_flower.protocol.packing import record_bytes
from deca_flower.protocol.tensors import block_to_record, record_to_block
from deca_flower.runtime import build_runtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fast_paths import best_of  # noqa: E402


def decode_by_copy(record) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in record_to_block(record, "bench").items()}


def main() -> None:
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    runtime = build_runtime(DecaConfig(layers_per_block=6, embeddings="frozen", eval_samples=8), 0)
    block = runtime.blocks[len(runtime.blocks) // 2]
    params = dict(runtime.node.model.named_parameters())
    half = {n: params[n].detach().clone() for n in block.param_names}
    record = block_to_record(half)
    mib = record_bytes(record) / 2**20
    print(f"block {block.name}: {mib:.1f} MiB")

    print(f"decode one neighbour block: copy {best_of(lambda: decode_by_copy(record)):.4f} s, "
          f"view {best_of(lambda: record_to_block(record, 'bench')):.4f} s")

    halves = [{n: t + 1e-3 * torch.randn_like(t) for n, t in half.items()} for _ in range(3)]

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # Message() needs a run id
    neighbours = {j: block_to_record(halves[j]) for j in (1, 2)}  # distinct bytes
    train = pm.request(1, pm.TrainStep(step=1, self_weight=0.5, weights={1: 0.25, 2: 0.25}, halves=neighbours))
    reply = Message(pm.StepResult(half=record).to_content(), dst_node_id=1, message_type=pm.TrainStep.MESSAGE_TYPE)
    for name, msg in (("train message (2 neighbour blocks)", train), ("reply (1 block)", reply)):
        in_band = in_band_copy(msg)
        data = cloudpickle.dumps(in_band, protocol=5)
        dumps = best_of(lambda m=in_band: cloudpickle.dumps(m, protocol=5), 3)
        loads = best_of(lambda d=data: pickle.loads(d), 3)
        print(f"Ray pickling, {name}, {len(data) / 2**20:.0f} MiB in band: dumps {dumps:.3f} s + loads {loads:.3f} s")
        dumps = best_of(lambda m=msg: out_of_band_dumps(m), 3)
        data, buffers = out_of_band_dumps(msg)
        loads = best_of(lambda d=data, b=buffers: pickle.loads(d, buffers=b), 3)
        print(f"Ray pickling, {name}, out of band ({len(data)} bytes + {len(buffers)} buffers): "
              f"dumps + one copy {dumps:.3f} s + loads {loads:.4f} s")


def in_band_copy(msg: Message) -> Message:
    """The same message with each block as plain bytes (how blocks travelled before)."""
    copy = pickle.loads(pickle.dumps(msg))
    for record in copy.content.array_records.values():
        for array in record.values():
            array.data = bytes(array.data)
    return copy


def out_of_band_dumps(msg: Message) -> tuple[bytes, list[bytearray]]:
    buffers: list[pickle.PickleBuffer] = []
    data = cloudpickle.dumps(msg, protocol=5, buffer_callback=buffers.append)
    return data, [bytearray(b.raw()) for b in buffers]  # Ray's one copy into its object store


if __name__ == "__main__":
    main()
