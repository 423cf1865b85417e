import json
import pickle
import struct

import pytest
import torch
from flwr.app import Array, ArrayRecord

from deca_flower.flower.records import PACKED, RecordError, block_to_record, record_bytes, record_to_block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_blocks_round_trip_bit_exact_without_upcast_in_one_array(dtype):
    block = {"w": torch.randn(3, 5).to(dtype), "b": torch.randn(7).to(dtype), "empty": torch.zeros(0, 4).to(dtype)}
    record = block_to_record(block)
    assert len(record) == 1  # one Flower object (plus its chunks) per block, not one per tensor
    payload = sum(t.numel() * t.element_size() for t in block.values())
    manifest = len(json.dumps([[n, str(t.dtype)[6:], list(t.shape)] for n, t in block.items()]))
    assert payload < record_bytes(record) <= payload + 8 + manifest + 8 * len(block)  # length + manifest + padding
    back = record_to_block(record, "test")
    assert list(back) == list(block)
    for name, tensor in block.items():
        assert back[name].dtype == dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name].view(torch.uint8), tensor.view(torch.uint8))


@pytest.mark.parametrize("protocol", [4, 5])
def test_pickled_blocks_arrive_intact_and_protocol_5_moves_the_bytes_out_of_band(protocol):
    block = {"w": torch.randn(64, 32), "b": torch.randn(32).to(torch.bfloat16)}
    buffers = []
    dumped = pickle.dumps(block_to_record(block), protocol=protocol, buffer_callback=buffers.append if protocol >= 5 else None)
    arrived = pickle.loads(dumped, buffers=buffers)
    if protocol >= 5:  # as Ray does: the payload is a separate buffer, not inside the pickle
        assert len(buffers) == 1 and len(dumped) < 1024
    back = record_to_block(arrived, "test")
    assert record_bytes(arrived) == record_bytes(block_to_record(block))
    for name, tensor in block.items():
        assert torch.equal(back[name].view(torch.uint8), tensor.view(torch.uint8))
    relayed = pickle.loads(pickle.dumps(arrived, protocol=protocol))  # the relay forwards what it received
    assert torch.equal(record_to_block(relayed, "relay")["w"], block["w"])


def packed(manifest: bytes, payload: bytes) -> ArrayRecord:
    """A hand-made packed block: the payload starts at the first 8-byte boundary after the manifest."""
    data = struct.pack("<Q", len(manifest)) + manifest + b"\x00" * (-(8 + len(manifest)) % 8) + payload
    return ArrayRecord({"block": Array(dtype="uint8", shape=(len(data),), stype=PACKED, data=data)})


def test_malformed_blocks_are_rejected_naming_the_sender():
    good = record_to_block(packed(b'[["w", "float32", [2]]]', b"\x00" * 8), "node 2")
    assert good["w"].tolist() == [0.0, 0.0]
    cases = [
        (packed(b'[["w", "float32", [4]]]', b"\x00" * 12), "describes"),  # truncated tensor
        (packed(b'[["w", "float32", [2]]]', b"\x00" * 12), "describes"),  # trailing bytes
        (packed(b'[["w", "int64", [1]]]', b"\x00" * 8), "manifest is not"),             # unknown dtype
        (packed(b'[["w", "float32", [-1]]]', b""), "manifest is not"),                  # negative dimension
        (packed(b'[["w", "float32", [4294967296, 4294967296]]]', b""), "describes"),  # 2^64 elements: int64 overflows to 0
        (packed(b'not json', b""), "unreadable manifest"),
        (ArrayRecord({"block": Array(dtype="uint8", shape=(3,), stype=PACKED, data=b"\x00" * 3)}), "too short"),
        (ArrayRecord({"block": Array(dtype="uint8", shape=(8,), stype=PACKED, data=struct.pack("<Q", 99))}),
         "manifest of 99 bytes"),
        (ArrayRecord({"w": Array(dtype="float32", shape=(1,), stype="raw", data=b"\x00" * 4)}), "expected one"),
    ]
    for record, message in cases:
        with pytest.raises(RecordError, match=message) as err:
            record_to_block(record, "node 2")
        assert "node 2" in str(err.value)


def test_a_name_sent_twice_is_rejected():
    record = packed(b'[["w", "float32", [1]], ["w", "float32", [1]]]', b"\x00" * 12)  # 4 bytes, 4 to align, 4
    with pytest.raises(RecordError, match="twice"):
        record_to_block(record, "node 2")
