"""BMA on a hand-computed 2-node, 1-parameter example (the update rule of docs/algorithm.md).

Node 1: theta=1.0, grad=0.5; node 2: theta=3.0, grad=-1.0; lr=0.1, W = [[.5,.5],[.5,.5]].
First Adam step (bias-corrected): half = theta - lr*sign(g) -> 0.9 and 3.1; mixed = 2.0.
Adam state after the step: m' = 0.1*g, v' = 0.001*g^2.  h_1 = (1.0 - 2.0)/0.1 = -10.
Gradient units: lr_t = lr/(1 - 0.9) = 1, D = sqrt(v'/0.001) = |g|; gossip moved node 1 by
c = half - mixed = -1.1 and node 2 by +1.1, so h = m' + s*c*D/lr_t = 0.05 - 0.55 s and -0.1 + 1.1 s.
"""

import pytest
import torch

from deca_flower.core.gossip import mix
from deca_flower.core.optimizer import BlockAdam

LR, B1, B2 = 0.1, 0.9, 0.999


def two_nodes(bma: str, discrepancy: str = "scaled", strength: float = 1.0, start=((1.0, 0.5), (3.0, -1.0))):
    nodes = []
    for theta, grad in start:
        param = torch.tensor([theta], dtype=torch.float64)
        opt = BlockAdam([param], lr=LR, bma=bma, bma_betas=(B1, B2), discrepancy=discrepancy, strength=strength)
        param.grad = torch.tensor([grad], dtype=torch.float64)
        opt.step()
        nodes.append((param, opt))
    halves = [p.clone() for p, _ in nodes]
    for i, (param, opt) in enumerate(nodes):
        opt.fold(mix([param], 0.5, [(0.5, [halves[1 - i]])]))
    return nodes, halves


def moments_of(opt: BlockAdam, param):
    state = opt.adam.state[param]
    return state["exp_avg"].clone(), state["exp_avg_sq"].clone()


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


@pytest.mark.parametrize("strength", [0.0, 1.0, 10.0])
def test_gradient_units_signal(strength):
    (p1, o1), (p2, o2) = two_nodes("full", "gradient", strength)[0]
    h1, h2 = 0.05 - 0.55 * strength, -0.1 + 1.1 * strength
    assert moments(o1, p1) == pytest.approx((B1 * 0.05 + (1 - B1) * h1, B2 * 0.00025 + (1 - B2) * h1 * h1))
    assert moments(o2, p2) == pytest.approx((B1 * -0.1 + (1 - B1) * h2, B2 * 0.001 + (1 - B2) * h2 * h2))


@pytest.mark.parametrize(("discrepancy", "h"), [("scaled", (0.1 - 1.1 * 3) / LR), ("raw", -(0.1 - 1.1 * 3))])
def test_strength_weighs_the_consensus_part(discrepancy, h):
    """d = u + s*c: node 1's own Adam update u = 0.1, gossip's correction c = -1.1, s = 3."""
    (p1, o1), _ = two_nodes("full", discrepancy, 3.0)[0]
    assert moments(o1, p1) == pytest.approx((B1 * 0.05 + (1 - B1) * h, B2 * 0.00025 + (1 - B2) * h * h))


def test_gradient_units_are_neutral_where_nodes_agree():
    """Same theta and gradient on both nodes: mixed = half, so h = m' and the fold leaves m exactly
    as Adam left it (v moves by (1 - b2)(m'^2 - v'))."""
    folded = {}
    for bma in ("full", "none"):
        param = torch.tensor([1.0, -2.0], dtype=torch.float64)
        opt = BlockAdam([param], lr=LR, bma=bma, bma_betas=(B1, B2), discrepancy="gradient", strength=50.0)
        param.grad = torch.tensor([0.5, 0.25], dtype=torch.float64)
        opt.step()
        opt.fold([param.clone()])  # every neighbour sent the same half: mixed = half
        folded[bma] = moments_of(opt, param)
    (m, v), (m_adam, v_adam) = folded["full"], folded["none"]
    assert torch.equal(m, m_adam)  # bit for bit
    torch.testing.assert_close(v, B2 * v_adam + (1 - B2) * m_adam**2, rtol=1e-12, atol=0)


def test_zero_strength_leaves_the_first_moment_alone():
    (p1, o1), _ = two_nodes("full", "gradient", 0.0)[0]
    (q1, adam_only), _ = two_nodes("none")[0]
    assert moments(o1, p1)[0] == moments(adam_only, q1)[0]  # bit for bit, though the nodes disagree


def test_negative_strength_is_refused():
    with pytest.raises(ValueError, match="strength"):
        BlockAdam([torch.zeros(1)], lr=1e-3, strength=-1.0)


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


@pytest.mark.parametrize("bma", ["full", "trivial"])
@pytest.mark.parametrize(("discrepancy", "strength"), [("scaled", 1.0), ("raw", 1.0), ("normalized", 1.0),
                                                       ("gradient", 1.0), ("gradient", 30.0), ("scaled", 0.5)])
def test_fold_without_a_theta_copy_matches_the_definition(monkeypatch, bma, discrepancy, strength):
    """fold recomputes theta - half from Adam's moments instead of keeping theta: the moments it
    leaves must equal the rule of docs/algorithm.md computed from an explicit theta copy, over slices and steps
    (float64, so that the rounding of theta - half itself stays far below the tolerance)."""
    import deca_flower.core.optimizer as optimizer

    monkeypatch.setattr(optimizer, "FOLD_SLICE", 7)  # several slices per tensor
    gen = torch.Generator().manual_seed(0)
    masters = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((5, 4), (3,), (2,))]
    opt = BlockAdam(masters, lr=1e-3, bma=bma, bma_betas=(B1, B2), discrepancy=discrepancy, strength=strength)
    for t in range(1, 4):
        theta = [m.clone() for m in masters]
        before = [tuple(x.clone() for x in opt._moments(m)) for m in masters]
        for m in masters[:2]:  # the last tensor gets no gradient this step: Adam leaves it alone
            m.grad = torch.randn(m.shape, generator=gen, dtype=torch.float64)
        opt.step()
        after = [tuple(x.clone() for x in opt._moments(m)) for m in masters]
        half = [m.clone() for m in masters]
        mixed = [m + 1e-3 * torch.randn(m.shape, generator=gen, dtype=torch.float64) for m in masters]
        diffs = [(x - h) + strength * (h - y) for x, h, y in zip(theta, half, mixed)]  # u + s*c
        norm = torch.sqrt(sum(d.pow(2).sum() for d in diffs))
        # gradient units: D = sqrt(v' / (1 - a2^t)) + eps, lr_t = lr / (1 - a1^t)
        to_gradient = [(v.sqrt() / (1 - 0.999**t) ** 0.5 + 1e-8) / (1e-3 / (1 - 0.9**t)) for _, v in after]
        signals = {"scaled": [d / 1e-3 for d in diffs], "raw": [-d for d in diffs],
                   "normalized": [d / norm for d in diffs],
                   "gradient": [d * f for d, f in zip(diffs, to_gradient)]}[discrepancy]
        opt.fold(mixed)
        for i, (master, h) in enumerate(zip(masters, signals)):
            m0, v0 = (after if bma == "full" else before)[i]
            m, v = opt._moments(master)
            assert torch.equal(master, mixed[i])
            if not opt.adam.state.get(master):
                continue  # never stepped: nothing to fold into
            torch.testing.assert_close(m, B1 * m0 + (1 - B1) * h, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(v, B2 * v0 + (1 - B2) * h * h, rtol=1e-9, atol=1e-12)


def test_step_holds_grads_and_moments_only():
    """Per fp32 parameter at the step: 4 bytes of gradient and 8 of moments, no theta copy."""
    masters = [torch.zeros(10), torch.zeros(6)]
    opt = BlockAdam(masters, lr=1e-3)
    for m in masters:
        m.grad = torch.ones_like(m)
    assert opt.optimizer_bytes() == 16 * 4
    opt.step()
    assert opt.optimizer_bytes() == 16 * 8


def test_an_overflowing_signal_is_an_error_not_a_nan_model():
    """discrepancy='gradient' converts with Adam's own denominator, which holds the folded h*h: at a
    large strength h grows every step. An overflow stops the step with a message naming the knob."""
    param = torch.zeros(4)
    opt = BlockAdam([param], lr=1e-3, discrepancy="gradient", strength=1e30)
    param.grad = torch.ones(4)
    opt.step()
    with pytest.raises(FloatingPointError, match="bma-strength"):
        opt.fold([torch.full((4,), 1.0)])
