import pytest
import torch
from flwr.app import Array, ArrayRecord

from deca_flower.flower.records import RecordError, block_to_record, record_bytes, record_to_block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_blocks_round_trip_bit_exact_without_upcast(dtype):
    block = {"w": torch.randn(3, 5).to(dtype), "b": torch.randn(7).to(dtype)}
    record = block_to_record(block)
    assert record_bytes(record) == sum(t.numel() * t.element_size() for t in block.values())
    back = record_to_block(record, "test")
    for name, tensor in block.items():
        assert back[name].dtype == dtype
        assert torch.equal(back[name].view(torch.uint8), tensor.view(torch.uint8))


def test_truncated_or_unknown_arrays_are_rejected():
    record = ArrayRecord()
    record["w"] = Array(dtype="float32", shape=(4,), stype="raw", data=b"\x00" * 12)
    with pytest.raises(RecordError, match="12 bytes"):
        record_to_block(record, "node 2")
    record["w"] = Array(dtype="int64", shape=(1,), stype="raw", data=b"\x00" * 8)
    with pytest.raises(RecordError, match="node 2"):
        record_to_block(record, "node 2")
