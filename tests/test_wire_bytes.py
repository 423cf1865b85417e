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


def test_a_compressed_train_message_costs_its_payloads_bytes_and_far_fewer_than_the_blocks():
    from deca_flower.core.compression import Codec, encode_block, payload_bytes
    from deca_flower.protocol.tensors import payload_to_record

    generator = torch.Generator().manual_seed(0)
    halves = {j: {"w": torch.randn(300, 1000, generator=generator), "b": torch.randn(1000, generator=generator)}
              for j in (1, 2)}
    codec = Codec("int4", 64)  # per element: half a byte of q + a 4-byte scale per 64
    payloads = {j: encode_block(codec, half.items(), 1) for j, half in halves.items()}
    ask = pm.TrainStep(step=1, block=0, self_weight=0.5, weights={1: 0.25, 2: 0.25},
                       halves={j: payload_to_record(p) for j, p in payloads.items()})
    wire = content_wire_bytes(ask.to_content())
    sent = sum(payload_bytes(p) for p in payloads.values())
    assert sent == 2 * (301_000 // 2 + 4 * -(-300_000 // 64) + 4 * -(-1000 // 64) + 2 * 8 * 4)  # q, scales, headers
    assert sent <= wire <= 1.01 * sent
    assert 2 * 301_000 * 4 / wire > 7  # against the uncompressed fp32 blocks
