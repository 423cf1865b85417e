"""The protocol: blocks packed bit-exact into one Array, and one typed message per purpose."""

import json
import pickle
import struct

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from deca_flower.core.reference import consensus_distance as torch_consensus_distance
from deca_flower.protocol import messages as pm
from deca_flower.protocol.packing import PACKED, RecordError, consensus_distance, record_bytes
from deca_flower.protocol.tensors import block_to_record, record_to_block


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
        (packed(b'[["w", "float32", [4294967296, 4294967296]]]', b""), "manifest is not"),  # 2^64 elements
        (packed(b'[["w", "float32", [0, 1000000000000000000000000000000]]]', b""), "manifest is not"),  # 0 elements
        (packed(b'[["w", "float32", [true]]]', b"\x00" * 8), "manifest is not"),  # a bool is no dimension
        (packed(b'[["w", "float32", [1, 1, 1, 1, 1, 1, 1, 1, 1]]]', b"\x00" * 8), "at most 8 dimensions"),
        (packed(b"[" * 200_000 + b"]" * 200_000, b""), "unreadable manifest"),  # nested too deep
        (packed(b"[" * 100_000, b""), "unreadable manifest"),  # deeper than the parser's recursion
        (packed(b" " * (1 << 20) + b"[]", b""), r"at most 1048576"),
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_relays_numpy_consensus_distance_is_the_nodes_torch_one(dtype, monkeypatch):
    monkeypatch.setattr("deca_flower.protocol.packing.FLOAT64_SLICE", 7)  # several slices per tensor
    torch.manual_seed(0)
    blocks = [{"w": torch.randn(5, 4).to(dtype), "b": torch.randn(3).to(dtype)} for _ in range(3)]
    expected = torch_consensus_distance(blocks)
    assert consensus_distance({pid: block_to_record(b) for pid, b in enumerate(blocks)}) == pytest.approx(expected,
                                                                                                          rel=1e-12)
    # by hand: mean over nodes of the squared distance to the nodes' mean
    flat = np.stack([np.concatenate([b[k].double().numpy().ravel() for k in ("w", "b")]) for b in blocks])
    assert expected == pytest.approx(float(((flat - flat.mean(0)) ** 2).sum(1).mean()), rel=1e-12)


def test_every_message_comes_back_from_its_records_as_it_was_sent():
    half = block_to_record({"w": torch.randn(3)})
    messages = [
        pm.Setup({"num-nodes": 4, "model": "m"}, fresh=False), pm.RejoinProbe({"seed": 1}), pm.Resume(visit=3),
        pm.Donate(blocks=[0, 2]), pm.InitialModel(), pm.Evaluate(samples=True), pm.Done(),
        pm.TrainStep(step=5, block=None, start=False, finish=2, self_weight=0.25, weights={1: 0.5, 3: 0.25},
                     halves={1: half, 3: half}, public_keys={1: "ab", 3: "cd"}, signatures={1: "ef", 3: "01"}),
        pm.TrainStep(step=0, block=1, start=True),  # the run's first step: nothing to mix, absent fields are None
        pm.NodeInfo(partition_id=2, device="cpu", train_examples=9, label_counts=[4, 5], label_names=["a", "b"],
                    own_data=False, num_blocks=3, block_names=["x", "y", "z"], steps_per_visit=2, setup_s=0.5),
        pm.StepResult(half=half, loss=1.5, step_s=0.1, opt_bytes=64.0, excluded=["node 1: NaN"]),
        pm.StepResult(sealed={1: half}), pm.Evaluation({"accuracy": 0.5, "num_examples": 20}, ["q"], ["a"]),
    ]
    for sent in messages:
        received = type(sent).from_content(sent.to_content())
        for name in vars(sent):
            value, back = getattr(sent, name), getattr(received, name)
            if isinstance(value, dict) and value and isinstance(next(iter(value.values())), ArrayRecord):
                assert {k: r.object_id for k, r in back.items()} == {k: r.object_id for k, r in value.items()}, name
            elif isinstance(value, ArrayRecord):
                assert back.object_id == value.object_id, name
            else:
                assert back == value and type(back) is type(value), (type(sent).__name__, name)
    assert pm.TrainStep.from_content(pm.TrainStep(step=0).to_content()).block is None  # None, not a sentinel


@pytest.mark.parametrize(("payload", "content", "message"), [
    (pm.Resume, RecordDict(), "lacks its ConfigRecord 'deca.fields'"),
    (pm.Resume, RecordDict({pm.FIELDS: ConfigRecord({"blocks": [1]})}), "'deca.fields' lacks 'visit'"),
    (pm.Resume, RecordDict({pm.FIELDS: ConfigRecord({"visit": True})}), "'visit' must be int, got True"),
    (pm.Donate, RecordDict({pm.FIELDS: ConfigRecord({"blocks": [1.5]})}), "must be int, got 1.5"),
    (pm.TrainStep, RecordDict({**pm.TrainStep(step=1, self_weight=0.5, weights={1: 0.5}).to_content(),
                               "deca.halves.2": block_to_record({"w": torch.zeros(1)})}),
     r"halves from \[2\] but weights for \[1\]"),
    (pm.TrainStep, RecordDict({pm.FIELDS: ConfigRecord({"step": 1, "start": False}),
                               "deca.weights": ConfigRecord({"self": 0.5})}), "keyed by partition ids"),
    (pm.Handover, RecordDict({pm.FIELDS: ConfigRecord({"visit": 1})}), "lacks its ArrayRecord 'deca.blocks'"),
])
def test_a_message_missing_what_its_type_needs_is_refused_naming_it(payload, content, message):
    with pytest.raises(pm.ProtocolError, match=message):
        payload.from_content(content)


def test_every_request_has_its_own_message_type():
    requests = [pm.Setup, pm.RejoinProbe, pm.Resume, pm.Donate, pm.Handover, pm.InitialModel, pm.TrainStep, pm.Evaluate]
    types = [r.MESSAGE_TYPE for r in requests]
    assert len(set(types)) == len(types) and all(t.split(".")[0] in ("query", "train", "evaluate") for t in types)
