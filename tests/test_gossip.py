import pytest
import torch

from deca_flower.core.gossip import BlockError, check_block, mix
from deca_flower.core.topology import build_graph, metropolis_hastings, neighbours


def test_mixing_preserves_the_average_exactly_in_float64():
    weights = metropolis_hastings(build_graph("erdos_renyi", 6, seed=2, edge_prob=0.4))
    torch.manual_seed(0)
    halves = [[torch.randn(5, 3, dtype=torch.float64)] for _ in range(6)]
    mixed = [mix(halves[i], weights[i, i], [(w, halves[j]) for j, w in neighbours(weights, i).items()])[0]
             for i in range(6)]
    # mix() accumulates in fp32; float64 inputs still agree to fp32 precision
    before, after = torch.stack([h[0] for h in halves]).mean(0), torch.stack(mixed).mean(0).double()
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_mixing_in_slices_gives_the_sums_of_a_whole_float64_copy():
    from deca_flower.core.gossip import FLOAT64_SLICE

    torch.manual_seed(3)
    own, a, b = (torch.randn(2, FLOAT64_SLICE + 5) for _ in range(3))  # two full slices and a short one
    expected = own.double().mul_(0.5).add_(a, alpha=0.3).add_(b, alpha=0.2).float()  # the whole block at once
    assert torch.equal(mix([own], 0.5, [(0.3, [a]), (0.2, [b])])[0], expected)
    with pytest.raises(ValueError, match="elements"):
        mix([own], 0.5, [(0.5, [a[:, :-1]])])


def test_weights_must_sum_to_one():
    with pytest.raises(ValueError, match="sum to"):
        mix([torch.zeros(2)], 0.5, [(0.4, [torch.zeros(2)])])


EXPECTED = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}


@pytest.mark.parametrize(("received", "message"), [
    ({"a": torch.zeros(2, 3), "b": torch.tensor([0.0, float("nan"), 0.0, 0.0])}, "NaN or Inf"),
    ({"a": torch.zeros(2, 3), "b": torch.tensor([0.0, float("inf"), 0.0, 0.0])}, "NaN or Inf"),
    ({"a": torch.zeros(2, 3), "b": torch.tensor([float("inf"), float("-inf"), 0.0, 0.0])}, "NaN or Inf"),
    ({"a": torch.zeros(3, 2), "b": torch.zeros(4)}, "shape"),
    ({"a": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(4)}, "dtype"),
    ({"a": torch.zeros(2, 3)}, "missing"),
    ({"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}, "unexpected"),
])
@pytest.mark.parametrize("max_deviation", [0.0, 1e6])  # with a limit the distance pass finds NaN/Inf
def test_bad_neighbour_blocks_are_rejected_with_the_sender_named(received, message, max_deviation):
    with pytest.raises(BlockError, match=message) as info:
        check_block(received, EXPECTED, "node 5", max_deviation)
    assert "node 5" in str(info.value)


def test_finite_blocks_whose_sum_overflows_are_not_mistaken_for_inf():
    huge = torch.full((4,), 3e38)  # finite, but the sum of the elements overflows float32
    assert not torch.isfinite(huge.sum())
    check_block({"a": torch.zeros(2, 3), "b": huge}, EXPECTED, "node 5")
    with pytest.raises(BlockError, match="NaN or Inf"):
        check_block({"a": torch.zeros(2, 3), "b": torch.tensor([3e38, 3e38, float("nan"), 0.0])}, EXPECTED, "node 5")
    with pytest.raises(BlockError, match="away"):  # with a limit: too far, not NaN
        check_block({"a": torch.zeros(2, 3), "b": huge}, EXPECTED, "node 5", max_deviation=1e6)


def test_nodes_that_agree_stay_exactly_agreed_with_thirds():
    # x/3 + x/3 + x/3 must give x back bit for bit: BMA divides any rounding error by lr
    torch.manual_seed(1)
    x = torch.randn(10000)
    mixed = mix([x], 1 / 3, [(1 / 3, [x.clone()]), (1 / 3, [x.clone()])])[0]
    assert torch.equal(mixed, x)


def test_bf16_halves_mix_in_difference_form_exact_at_consensus_and_average_preserving():
    torch.manual_seed(2)
    masters = [torch.randn(5000) * 0.02 for _ in range(3)]
    sent = [m.to(torch.bfloat16) for m in masters]
    agreed = mix([masters[0]], 0.5, [(0.25, [sent[0]]), (0.25, [sent[0]])], sent=[sent[0]])[0]
    assert torch.equal(agreed, masters[0])  # the plain form is off by bf16 rounding: BMA would read it / lr
    plain = mix([masters[0]], 0.5, [(0.25, [sent[0]]), (0.25, [sent[0]])])[0]
    assert not torch.equal(plain, masters[0])
    mixed = [mix([masters[i]], 0.5, [(0.25, [sent[j]]) for j in range(3) if j != i], sent=[sent[i]])[0]
             for i in range(3)]
    drift = (sum(m.double() for m in mixed) - sum(m.double() for m in masters)).abs().max()
    assert drift < 1e-8  # symmetric W: the differences cancel; the plain form drifts by ~1e-4 here


def test_a_bf16_node_that_agrees_with_its_neighbours_keeps_its_fp32_master(tiny_cfg):
    from deca_flower.runtime import build_runtime

    node = build_runtime(tiny_cfg, 0).node
    node.model.to(torch.bfloat16)
    node.start_block(1)
    node.local_step()
    masters = [m.clone() for m in node.active.masters]
    same = {k: v.clone() for k, v in node.block_values().items()}  # neighbours sent what this node sent
    node.apply_mix(0.5, [(0.25, same), (0.25, same)])
    assert node.active.has_copy
    assert all(torch.equal(m, before) for m, before in zip(node.active.masters, masters))


def test_consensus_distance_is_the_mean_squared_distance_to_the_average():
    from deca_flower.core.reference import consensus_distance

    torch.manual_seed(1)
    # offset: cancellation; "c" spans more than one slice of FLOAT64_SLICE elements
    blocks = [{"a": torch.randn(4, 3) + 10, "b": torch.randn(7), "c": torch.randn(300_000)} for _ in range(5)]
    expected = 0.0
    for name in ("a", "b", "c"):
        stacked = torch.stack([b[name].double() for b in blocks])
        expected += float(((stacked - stacked.mean(0)) ** 2).sum()) / len(blocks)
    assert consensus_distance(blocks) == pytest.approx(expected, rel=1e-12)
    assert consensus_distance([blocks[0]] * 3) == pytest.approx(0.0, abs=1e-9)
