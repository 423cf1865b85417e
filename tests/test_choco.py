"""CHOCO-gossip on public copies: consistent copies, no accumulating error, the average kept,
refused payloads, checkpoints and dropouts (through the reference: test_choco_reference.py)."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from deca_flower.core.choco import ChocoSettings, PublicCopies, default_gamma
from deca_flower.core.compression import Codec
from deca_flower.core.gossip import BlockError
from deca_flower.core.topology import build_graph, metropolis_hastings, neighbours

CODECS = [Codec("int8", 64), Codec("int4", 64), Codec("int8", 0), Codec("topk", fraction=0.1)]
SHAPES = [torch.Size([12, 40]), torch.Size([7])]
NAMES = ["w", "b"]


def gossip_step(copies: list[PublicCopies], values: list[list[torch.Tensor]], weights: np.ndarray,
                alive: list[int]) -> list[list[torch.Tensor]]:
    """Every alive node publishes, receives its alive neighbours' payloads and mixes."""
    payloads = {i: copies[i].publish(values[i]) for i in alive}
    mixed = {}
    for i in alive:
        nbrs = {j: w for j, w in neighbours(weights, i).items() if j in alive}
        for j in nbrs:
            copies[i].receive(f"node {j}", payloads[j])
        mixed[i] = copies[i].mixed(values[i], {f"node {j}": w for j, w in nbrs.items()})
    return [mixed.get(i, values[i]) for i in range(len(values))]


def network(codec: Codec, n: int = 5, gamma: float | None = None, seed: int = 0):
    torch.manual_seed(seed)
    weights = metropolis_hastings(build_graph("erdos_renyi", n, seed=seed, edge_prob=0.5))
    settings = ChocoSettings(codec, gamma or default_gamma(codec))
    copies = [PublicCopies(settings, NAMES, SHAPES, torch.device("cpu")) for _ in range(n)]
    values = [[torch.randn(s) for s in SHAPES] for _ in range(n)]
    return weights, copies, values


def mean_of(values: list[list[torch.Tensor]], nodes: list[int]) -> list[torch.Tensor]:
    return [torch.stack([values[i][k].double() for i in nodes]).mean(0) for k in range(len(SHAPES))]


def spread(values: list[list[torch.Tensor]]) -> float:
    return max(float((torch.stack(t) - torch.stack(t).mean(0)).abs().max()) for t in zip(*values))


@pytest.mark.parametrize("codec", CODECS)
def test_gossip_on_public_copies_keeps_the_average_and_reaches_consensus(codec):
    weights, copies, values = network(codec)
    before, spread_before = mean_of(values, range(5)), spread(values)
    for _ in range(60):  # no local steps: lr = 0
        values = gossip_step(copies, values, weights, list(range(5)))
    for b, a in zip(before, mean_of(values, range(5))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # 60 fp32 roundings of values ~ 1
    assert spread(values) < 0.1 * spread_before  # bench/compression_codecs.py prints the spreads per step


def test_top_k_at_gamma_one_does_not_reach_consensus():
    """Why default_gamma is smaller for top-k: at gamma = 1 the copies lag the blocks and the mix overshoots."""
    weights, copies, values = network(Codec("topk", fraction=0.1), gamma=1.0)
    spread_before = spread(values)
    for _ in range(30):
        values = gossip_step(copies, values, weights, list(range(5)))
    assert spread(values) > spread_before


@pytest.mark.parametrize("codec", CODECS)
def test_every_copy_of_a_node_is_its_own_public_copy_bit_for_bit(codec):
    weights, copies, values = network(codec)
    for _ in range(4):
        values = [[v + 0.01 * torch.randn_like(v) for v in node] for node in values]  # local steps
        values = gossip_step(copies, values, weights, list(range(5)))
        for i in range(5):
            for j in neighbours(weights, i):
                assert all(torch.equal(a, b) for a, b in zip(copies[i].copies[f"node {j}"], copies[j].own))


@pytest.mark.parametrize("codec", [Codec("int4", 64), Codec("topk", fraction=0.1)])
def test_compression_error_does_not_accumulate(codec):
    """A block that keeps moving: with error feedback the public copy stays within a bounded
    distance; adding C(change) without feedback drifts further at every step."""
    torch.manual_seed(3)
    copies = PublicCopies(ChocoSettings(codec), ["w"], [torch.Size([4000])], torch.device("cpu"))
    x = torch.randn(4000)
    copies.publish([x])
    no_feedback = x.clone()  # as if the first payload had been exact
    errors, drift = [], []
    for _ in range(60):
        change = 0.01 * torch.randn(4000)
        x = x + change
        copies.publish([x])
        codec.add_decoded(no_feedback, codec.encode(change))
        errors.append(float((copies.own[0] - x).norm()))
        drift.append(float((no_feedback - x).norm()))
    assert max(errors[30:]) < 1.5 * max(errors[:30])   # bounded, not growing
    assert drift[-1] > 2 * drift[9] and drift[-1] > 3 * errors[-1]


class Allocated(Exception):
    """Raised by the allocators a refused payload must not reach."""


def test_a_refused_payload_allocates_nothing_and_keeps_the_sender_out_of_sync(monkeypatch):
    weights, copies, values = network(Codec("int8", 64), n=3)
    payload = copies[1].publish(values[1])
    bad = dict(payload, **{"w/header": torch.tensor([1, 1 << 40, 64, 0])})  # claims 2^40 elements

    def allocate(*args, **kwargs):
        raise Allocated(f"allocated {args} before the payload was checked")

    with monkeypatch.context() as patched:
        for name in ("zeros", "zeros_like", "empty", "empty_like"):
            patched.setattr(torch, name, allocate)
        with pytest.raises(BlockError, match="node 1"):  # not Allocated: refused before the copy is made
            copies[0].receive("node 1", bad)
    assert "node 1" not in copies[0].copies
    with pytest.raises(BlockError, match="missed a payload"):  # the good one now comes too late
        copies[0].receive("node 1", payload)
    copies[0].publish(values[0])
    with pytest.raises(ValueError, match="cannot mix node 1"):
        copies[0].mixed(values[0], {"node 1": 0.5})


def test_a_copy_that_is_too_far_or_overflows_is_refused():
    def fresh() -> PublicCopies:
        return PublicCopies(ChocoSettings(Codec("int8", 4)), ["w"], [torch.Size([8])], torch.device("cpu"))

    payload = fresh().publish([torch.full((8,), 100.0)])
    with pytest.raises(BlockError, match="away"):
        fresh().receive("node 1", payload, {"w": torch.ones(8)}, max_deviation=0.5)
    huge = dict(payload, **{"w/scale": torch.full((2,), 3e38 / 127)})  # the largest scale a payload may have
    copies = fresh()
    copies.receive("node 1", huge, {"w": torch.zeros(8)})
    with pytest.raises(BlockError, match="NaN or Inf"):  # twice: the copy overflows
        copies.receive("node 1", dict(huge, **{"w/header": torch.tensor([1, 8, 4, 1])}), {"w": torch.zeros(8)})


def test_a_dropped_neighbour_is_forgotten_and_the_rest_keep_their_average():
    weights, copies, values = network(Codec("int4", 64), n=5, seed=1)
    alive = list(range(5))
    for _ in range(3):
        values = gossip_step(copies, values, weights, alive)
    alive = [0, 1, 2, 3]
    for i in alive:
        copies[i].forget("node 4")
    graph = build_graph("erdos_renyi", 5, seed=1, edge_prob=0.5).subgraph(alive)
    weights = metropolis_hastings(graph, size=5)
    before = mean_of(values, alive)
    for _ in range(5):
        values = gossip_step(copies, values, weights, alive)
    for b, a in zip(before, mean_of(values, alive)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert all("node 4" not in copies[i].copies for i in alive)


def test_copies_are_checkpointable_tensors(tmp_path):
    """Resume mid-visit: the copies saved with safetensors and restored in a fresh object give the
    same mixes as the uninterrupted run."""
    weights, copies, values = network(Codec("topk", fraction=0.2), n=4)
    values = gossip_step(copies, values, weights, list(range(4)))
    payloads = [c.publish(v) for c, v in zip(copies, values)]  # published, not yet mixed
    for i, c in enumerate(copies):
        save_file({k: t.contiguous() for k, t in c.state_tensors().items()}, tmp_path / f"node{i}.safetensors")
    restored = [PublicCopies(c.settings, NAMES, SHAPES, torch.device("cpu")) for c in copies]
    for i, c in enumerate(restored):
        c.load_state_tensors(load_file(tmp_path / f"node{i}.safetensors"))
    for net in (copies, restored):
        for i in range(4):
            for j in neighbours(weights, i):
                net[i].receive(f"node {j}", payloads[j])
    for i in range(4):
        mix = {f"node {j}": w for j, w in neighbours(weights, i).items()}
        assert all(torch.equal(a, b) for a, b in zip(copies[i].mixed(values[i], mix), restored[i].mixed(values[i], mix)))
    assert restored[0].sent == copies[0].sent == 2


def test_settings_are_checked():
    with pytest.raises(ValueError, match="gamma"):
        ChocoSettings(Codec("int8"), gamma=0.0)
    assert default_gamma(Codec("topk", fraction=0.1)) == 0.2 and default_gamma(Codec("int4")) == 1.0
    assert ChocoSettings(Codec("topk", chunk=32)).codec_at(0) == Codec("int8", 32)
    assert ChocoSettings(Codec("topk", chunk=32)).codec_at(1).name == "topk"
