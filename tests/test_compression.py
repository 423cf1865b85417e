"""Codecs of compressed gossip: values computed by hand, and payloads refused before decoding."""

import pytest
import torch

from deca_flower.core.compression import (
    Codec,
    add_block,
    check_payload,
    encode_block,
    layout_bytes,
    payload_bytes,
    payload_layout,
)
from deca_flower.core.gossip import BlockError


def decoded(codec: Codec, x: torch.Tensor) -> torch.Tensor:
    copy = torch.zeros_like(x)
    codec.add_decoded(copy, codec.encode(x))
    return copy


def test_int8_per_chunk_scales_by_hand():
    # chunks of 2: [127, -63] scale 1; [5, 254] scale 2 (5 / 2 = 2.5 rounds to even: 2); [0] scale 0
    x = torch.tensor([127.0, -63.0, 5.0, 254.0, 0.0])
    parts = Codec("int8", chunk=2).encode(x)
    assert torch.equal(parts["scale"], torch.tensor([1.0, 2.0, 0.0]))
    assert torch.equal(parts["q"], torch.tensor([127, -63, 2, 127, 0], dtype=torch.int8))
    assert torch.equal(decoded(Codec("int8", chunk=2), x), torch.tensor([127.0, -63.0, 4.0, 254.0, 0.0]))


def test_int8_per_row_scales_by_hand():
    x = torch.tensor([[127.0, 0.0, -127.0], [0.0, 63.0, 254.0]])
    parts = Codec("int8", chunk=0).encode(x)
    assert torch.equal(parts["scale"], torch.tensor([1.0, 2.0]))
    assert torch.equal(parts["q"], torch.tensor([127, 0, -127, 0, 32, 127], dtype=torch.int8))  # 31.5 -> 32


def test_int4_packs_two_values_per_byte_by_hand():
    # chunks of 2: [7, -3.5] scale 1 -> q 7, -4 (half to even); [1, 14] scale 2 -> q 0 (0.5 -> 0), 7;
    # [2] scale 2/7: q 7. Nibbles q + 8 = 15, 4 | 8, 15 | 15, pad 8 -> bytes 15 + 4*16, 8 + 15*16, 15 + 8*16
    x = torch.tensor([7.0, -3.5, 1.0, 14.0, 2.0])
    parts = Codec("int4", chunk=2).encode(x)
    assert torch.equal(parts["q"], torch.tensor([79, 248, 143], dtype=torch.uint8))
    assert torch.equal(decoded(Codec("int4", chunk=2), x)[:4], torch.tensor([7.0, -4.0, 0.0, 14.0]))


def test_topk_sends_the_largest_entries_with_sorted_indices():
    x = torch.tensor([0.1, -5.0, 3.0, 0.2, 4.0])
    parts = Codec("topk", fraction=0.4).encode(x)  # k = ceil(0.4 * 5) = 2
    assert torch.equal(parts["index"], torch.tensor([1, 4], dtype=torch.int32))
    assert torch.equal(parts["value"], torch.tensor([-5.0, 4.0]))
    assert torch.equal(decoded(Codec("topk", fraction=0.4), x), torch.tensor([0.0, -5.0, 0.0, 0.0, 4.0]))
    assert Codec("topk", fraction=0.5).param((5,)) == 3


@pytest.mark.parametrize("codec", [Codec("int8", 64), Codec("int8", 0), Codec("int4", 64), Codec("topk", fraction=0.1)])
def test_payload_sizes_follow_the_layout(codec):
    torch.manual_seed(0)
    block = {"w": torch.randn(33, 70), "b": torch.randn(7)}  # tails: neither a multiple of 64 nor even
    payload = encode_block(codec, block.items(), seq=3)
    layout = payload_layout(codec, {k: v.shape for k, v in block.items()})
    assert list(payload) == list(layout)
    assert {k: (t.dtype, t.numel()) for k, t in payload.items()} == layout
    assert payload_bytes(payload) == layout_bytes(codec, {k: v.shape for k, v in block.items()})
    assert payload["w/header"].tolist()[1:] == [33 * 70, codec.param((33, 70)), 3]


def test_bytes_per_element():
    shape = (576, 1536)  # a SmolLM2 MLP matrix
    fp32 = 4 * 576 * 1536
    ratio = {name: fp32 / payload_bytes(encode_block(codec, {"w": torch.randn(shape)}.items(), 0))
             for name, codec in {"int8": Codec("int8", 64), "int4": Codec("int4", 64), "int8-row": Codec("int8", 0),
                                 "topk": Codec("topk", fraction=0.1)}.items()}
    # int8: 1 byte + 4/64 of a scale; int4: half a byte + 4/64; topk: 8 bytes per kept entry
    assert ratio["int8"] == pytest.approx(4 / (1 + 4 / 64), rel=1e-3)
    assert ratio["int4"] == pytest.approx(4 / (0.5 + 4 / 64), rel=1e-3)
    assert ratio["int8-row"] == pytest.approx(4 / (1 + 4 / 1536), rel=1e-3)
    assert ratio["topk"] == pytest.approx(5.0, rel=1e-3)


@pytest.mark.parametrize("codec", [Codec("int8", 16), Codec("int4", 16)])
def test_quantisation_error_is_at_most_half_a_step(codec):
    torch.manual_seed(1)
    x = torch.randn(1000)  # 62 chunks of 16 and one of 8
    levels = 127 if codec.name == "int8" else 7
    for chunk, error in zip(x.split(16), (decoded(codec, x) - x).split(16)):
        assert float(error.abs().max()) <= float(chunk.abs().max()) / levels / 2 * (1 + 1e-5)


def test_decoding_adds_to_the_copy_in_place():
    codec = Codec("int8", 2)
    copy = torch.tensor([1.0, 1.0, 1.0])
    add_block(codec, {"w": copy}, encode_block(codec, {"w": torch.tensor([127.0, 0.0, 2.0])}.items(), 0))
    assert torch.equal(copy, torch.tensor([128.0, 1.0, 3.0]))


def test_codec_settings_are_checked():
    with pytest.raises(ValueError, match="codec"):
        Codec("int2")
    with pytest.raises(ValueError, match="chunk"):
        Codec("int8", chunk=-1)
    with pytest.raises(ValueError, match="fraction"):
        Codec("topk", fraction=0.0)


SHAPES = {"w": (4, 6), "b": (5,)}


def good_payload(codec: Codec, seq: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    return encode_block(codec, {k: torch.randn(s) for k, s in SHAPES.items()}.items(), seq)


def altered(payload: dict[str, torch.Tensor], key: str, value: torch.Tensor | None) -> dict[str, torch.Tensor]:
    out = dict(payload)
    if value is None:
        del out[key]
    else:
        out[key] = value
    return out


INT8 = Codec("int8", 4)
INT4 = Codec("int4", 4)
TOPK = Codec("topk", fraction=0.5)
P8, P4, PK = good_payload(INT8), good_payload(INT4), good_payload(TOPK)


def q_with(payload: dict[str, torch.Tensor], key: str, position: int, value: int) -> torch.Tensor:
    q = payload[key].clone()
    q[position] = value
    return q


def index_with(position: int, value: int) -> torch.Tensor:
    index = PK["w/index"].clone()  # 12 = ceil(0.5 * 24) sorted indices
    index[position] = value
    return index



@pytest.mark.parametrize(("codec", "payload", "message"), [
    (INT8, altered(P8, "w/scale", torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0, 1.0])), "NaN"),
    (INT8, altered(P8, "w/scale", torch.tensor([1.0, float("inf"), 1.0, 1.0, 1.0, 1.0])), "Inf"),
    (INT8, altered(P8, "w/scale", torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0, 1.0])), "negative"),
    (INT8, altered(P8, "w/scale", torch.tensor([1.0, 3e38, 1.0, 1.0, 1.0, 1.0])), "overflowing"),
    (INT8, altered(P8, "w/q", P8["w/q"][:-1]), "its header"),                         # wrong length
    (INT8, altered(P8, "w/q", P8["w/q"].to(torch.int16)), "its header"),              # wrong dtype
    (INT8, altered(P8, "w/header", torch.tensor([1, 1 << 40, 4, 0])), "header says"),  # size not the block's
    (INT8, altered(P8, "w/header", torch.tensor([2, 24, 4, 0])), "header says"),       # another codec
    (INT8, altered(P8, "w/header", torch.tensor([1, 24, 4, 5])), "header says"),       # another seq
    (INT8, altered(P8, "w/header", torch.tensor([1.0, 24.0, 4.0, 0.0])), "header of"),
    (INT8, altered(P8, "b/q", None), "missing"),
    (INT8, altered(P8, "c/q", torch.zeros(1, dtype=torch.int8)), "unexpected"),
    (TOPK, altered(PK, "w/index", index_with(-1, 24)), "out of range"),
    (TOPK, altered(PK, "w/index", index_with(0, -1)), "out of range"),
    (TOPK, altered(PK, "w/index", index_with(1, int(PK["w/index"][2]))), "strictly increasing"),
    (TOPK, altered(PK, "w/value", PK["w/value"][:11]), "its header"),
    (TOPK, altered(PK, "b/value", torch.tensor([1.0, float("nan"), 0.0])), "NaN"),
    (INT8, altered(P8, "w/q", q_with(P8, "w/q", 3, -128)), r"quantised values outside \[-127, 127\]"),
    (INT4, altered(P4, "w/q", q_with(P4, "w/q", 3, 0x70)), r"nibble 0"),             # low nibble 0: q = -8
    (INT4, altered(P4, "w/q", q_with(P4, "w/q", 3, 0x07)), r"nibble 0"),             # high nibble 0
    (INT4, altered(P4, "b/q", q_with(P4, "b/q", 2, int(P4["b/q"][2]) & 15)), "padding nibble"),  # b: 5 values, 1 pad
    (INT8, altered(P8, "w/header", P8["w/header"].reshape(2, 2)), r"header of shape \(2, 2\)"),
    (INT8, altered(P8, "w/scale", P8["w/scale"].reshape(6, 1)), r"shape \(6, 1\)"),      # would broadcast rows x rows
    (TOPK, altered(PK, "w/index", index_with(1, int(PK["w/index"][2])).reshape(1, 12)), r"shape \(1, 12\)"),  # a duplicate
])
def test_malformed_payloads_are_refused_naming_the_sender(codec, payload, message):
    with pytest.raises(BlockError, match=message) as info:
        check_payload(payload, codec, SHAPES, 0, "node 7")
    assert "node 7" in str(info.value)


def test_a_good_payload_passes():
    check_payload(P8, INT8, SHAPES, 0, "node 7")
    check_payload(P4, INT4, SHAPES, 0, "node 7")
    check_payload(PK, TOPK, SHAPES, 0, "node 7")


@pytest.mark.parametrize(("changes", "message"), [
    ({"compression": "int2"}, "compression='int2' is not one of"),
    ({"compression_chunk": -1}, "compression-chunk must be >= 0"),
    ({"compression": "int8", "consensus_step_size": 1.5}, r"consensus-step-size must be in \[0, 1\]"),
    ({"consensus_step_size": 0.5}, "consensus-step-size=0.5 is for compressed gossip; compression='none'"),
    ({"compression": "int8", "method": "fedavg"}, "method='fedavg' sends models"),
    ({"compression": "topk"}, "compression='topk' makes the nodes drift apart within a visit"),
    ({"compression": "int4", "steps_per_block": 1},
     "compression='int4' needs steps-per-block >= 2, got 1: the first exchange of a visit only fills the public copies"),
])
def test_compression_config_is_checked(changes, message):
    from deca_flower.config import ConfigError, DecaConfig

    with pytest.raises(ConfigError, match=message):
        DecaConfig(model="tiny-random", **changes)


def test_the_run_config_picks_codec_and_gamma():
    from deca_flower.config import DecaConfig
    from deca_flower.runtime import choco_settings

    assert choco_settings(DecaConfig(model="tiny-random")) is None
    int8 = choco_settings(DecaConfig(model="tiny-random", compression="int8", compression_chunk=32))
    assert int8.codec == Codec("int8", 32) and int8.gamma == 1.0  # 0: the codec's gamma
    int4 = choco_settings(DecaConfig(model="tiny-random", compression="int4", compression_chunk=0,
                                     consensus_step_size=0.5))
    assert int4.codec == Codec("int4", 0) and int4.gamma == 0.5
