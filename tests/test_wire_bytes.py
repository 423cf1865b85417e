"""What a gossip message costs on the wire: the block bytes and little more (bench/wire_bytes.py)."""

import torch

from deca_flower.flower.internals import content_wire_bytes
from deca_flower.protocol import messages as pm
from deca_flower.protocol.tensors import block_to_record


def test_a_train_message_costs_its_blocks_bytes_and_little_more():
    generator = torch.Generator().manual_seed(0)
    halves = {j: {"w": torch.randn(300, 1000, generator=generator), "b": torch.randn(1000, generator=generator)}
              for j in (1, 2)}
    ask = pm.TrainStep(step=1, block=0, self_weight=0.5, weights={1: 0.25, 2: 0.25},
                       halves={j: block_to_record(half) for j, half in halves.items()})
    payload = 2 * (300 * 1000 + 1000) * 4
    assert payload <= content_wire_bytes(ask.to_content()) <= 1.01 * payload
