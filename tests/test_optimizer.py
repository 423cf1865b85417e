"""BMA on a hand-computed 2-node, 1-parameter example (DECA.md's update rule).

Node 1: theta=1.0, grad=0.5; node 2: theta=3.0, grad=-1.0; lr=0.1, W = [[.5,.5],[.5,.5]].
First Adam step (bias-corrected): half = theta - lr*sign(g) -> 0.9 and 3.1; mixed = 2.0.
Adam state after the step: m' = 0.1*g, v' = 0.001*g^2.  h_1 = (1.0 - 2.0)/0.1 = -10.
"""

import pytest
import torch

from deca_flower.core.gossip import mix
from deca_flower.core.optimizer import BlockAdam

LR, B1, B2 = 0.1, 0.9, 0.999


def two_nodes(bma: str, discrepancy: str = "scaled"):
    nodes = []
    for theta, grad in ((1.0, 0.5), (3.0, -1.0)):
        param = torch.tensor([theta], dtype=torch.float64)
        opt = BlockAdam([param], lr=LR, bma=bma, bma_betas=(B1, B2), discrepancy=discrepancy)
        param.grad = torch.tensor([grad], dtype=torch.float64)
        opt.step()
        nodes.append((param, opt))
    halves = [p.clone() for p, _ in nodes]
    for i, (param, opt) in enumerate(nodes):
        opt.fold(mix([param], 0.5, [(0.5, [halves[1 - i]])]))
    return nodes, halves


def moments(opt: BlockAdam, param):
    state = opt.adam.state[param]
    return state["exp_avg"].item(), state["exp_avg_sq"].item()


def test_half_step_and_mixing():
    nodes, halves = two_nodes("none")
    assert [h.item() for h in halves] == pytest.approx([0.9, 3.1])
    assert [p.item() for p, _ in nodes] == pytest.approx([2.0, 2.0])


def test_bma_none_keeps_adam_moments():
    (p1, o1), _ = two_nodes("none")[0]
    assert moments(o1, p1) == pytest.approx((0.1 * 0.5, 0.001 * 0.25))


def test_bma_full_folds_signal_into_fresh_moments():
    (p1, o1), (p2, o2) = two_nodes("full")[0]
    assert moments(o1, p1) == pytest.approx((B1 * 0.05 + (1 - B1) * -10.0, B2 * 0.00025 + (1 - B2) * 100.0))
    assert moments(o2, p2) == pytest.approx((B1 * -0.1 + (1 - B1) * 10.0, B2 * 0.001 + (1 - B2) * 100.0))


def test_bma_trivial_moments_carry_only_the_signal():
    (p1, o1), _ = two_nodes("trivial")[0]
    assert moments(o1, p1) == pytest.approx(((1 - B1) * -10.0, (1 - B2) * 100.0))


@pytest.mark.parametrize(("discrepancy", "h"), [("raw", 1.0), ("normalized", -1.0)])
def test_discrepancy_conventions(discrepancy, h):
    (p1, o1), _ = two_nodes("full", discrepancy)[0]
    assert moments(o1, p1) == pytest.approx((B1 * 0.05 + (1 - B1) * h, B2 * 0.00025 + (1 - B2) * h * h))


def test_second_step_uses_folded_moments_and_step_count():
    (p1, o1), _ = two_nodes("full")[0]
    m, v = moments(o1, p1)
    p1.grad = torch.tensor([0.2], dtype=torch.float64)
    before = p1.item()
    o1.step()
    m2, v2 = 0.9 * m + 0.1 * 0.2, 0.999 * v + 0.001 * 0.04
    expected = before - LR * (m2 / (1 - 0.9**2)) / ((v2 / (1 - 0.999**2)) ** 0.5 + 1e-8)
    assert p1.item() == pytest.approx(expected) and o1.steps_taken == 2


def test_scaled_discrepancy_refuses_zero_lr():
    with pytest.raises(ValueError, match="lr=0"):
        BlockAdam([torch.zeros(1)], lr=0.0, bma="full")
