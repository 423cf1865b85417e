"""CHOCO-gossip through the single-process reference: oracle and fast path bit for bit, the average
kept with lr = 0, BMA on the public copies, rejoins, the plan's copies and bytes, and 'none' pinned
to the uncompressed gossip."""

import hashlib

import pytest
import torch

from deca_flower.core.reference import run_reference
from deca_flower.core.schedule import build_schedule
from deca_flower.core.topology import build_graph, metropolis_hastings
from deca_flower.plan import make_plan
from deca_flower.reference_run import build_nodes, run_reference_job


def test_a_neighbour_that_rejoined_starts_the_next_visit_from_its_donated_block(tiny_cfg):
    """Copies live for one visit: after a node took a neighbour's blocks (its rejoin donation)
    everyone's copy of it starts again from zero and follows the donated values."""
    cfg = tiny_cfg.replace(num_nodes=3, topology="complete", compression="int4")
    nodes = [rt.node for rt in build_nodes(cfg)]
    weights = metropolis_hastings(build_graph("complete", 3))
    schedule = build_schedule(len(nodes[0].blocks), 1, "descending")
    run_reference(nodes, weights, schedule[:1], 2)
    block = schedule[1].block
    nodes[2].overwrite_block(block, {k: v + 0.05 for k, v in nodes[0].stored_block(block).items()})  # donated
    for node in nodes:
        node.start_block(block)
        node.local_step()
    payloads = [node.publish() for node in nodes]
    nodes[0].receive("node 2", payloads[2])
    donated = [m.detach() for m in nodes[2].active.masters]
    assert all(torch.equal(a, b) for a, b in zip(nodes[0].public.copies["node 2"], nodes[2].public.own))
    for copy, value in zip(nodes[0].public.copies["node 2"], donated):  # the first payload is int8
        assert float((copy - value).abs().max()) <= float(value.abs().max()) / 127


def perturbed(cfg, scale: float) -> list:
    """cfg's nodes, made to disagree by seeded noise of this scale."""
    nodes = [rt.node for rt in build_nodes(cfg)]
    with torch.no_grad():
        for pid, node in enumerate(nodes):
            torch.manual_seed(pid)
            for p in node.model.parameters():
                p.add_(torch.randn_like(p) * scale)
    return nodes


def trained(cfg, nodes: list | None = None, *, fast: bool = False) -> list:
    """The nodes (default: cfg's) after a reference run of cfg, without evaluations."""
    nodes = nodes or [rt.node for rt in build_nodes(cfg)]
    weights = metropolis_hastings(build_graph(cfg.topology, cfg.num_nodes, seed=cfg.seed, edge_prob=cfg.edge_prob))
    schedule = build_schedule(len(nodes[0].blocks), cfg.rounds, cfg.block_order, cfg.seed)
    run_reference(nodes, weights, schedule, cfg.steps_per_block, fast=fast)
    return nodes


def stacked_parameters(nodes: list) -> list[torch.Tensor]:
    return [torch.stack([p.detach().double() for p in ps]) for ps in zip(*(n.model.parameters() for n in nodes))]


@pytest.mark.parametrize("compression", ["int8", "int4"])
def test_reference_oracle_and_fast_path_agree_bit_for_bit(tiny_cfg, compression):
    cfg = tiny_cfg.replace(num_nodes=4, topology="erdos_renyi", compression=compression, consensus_step_size=0.8)
    oracle, fast = trained(cfg), trained(cfg, fast=True)
    for a, b in zip(oracle, fast):
        for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
            assert torch.equal(pa, pb), name
    assert oracle[0].public is None and oracle[0].peak_public_bytes > fast[0].peak_public_bytes > 0


@pytest.mark.parametrize("compression", ["int8", "int4"])
def test_reference_with_lr_zero_keeps_the_network_average(tiny_cfg, compression):
    cfg = tiny_cfg.replace(lr=0.0, bma="none", num_nodes=4, topology="ring", compression=compression)
    nodes = perturbed(cfg, 0.1)
    before = stacked_parameters(nodes)
    after = stacked_parameters(trained(cfg, nodes))
    for b, a in zip(before, after):
        torch.testing.assert_close(a.mean(0), b.mean(0), rtol=0, atol=1e-6)
        assert float((a - a.mean(0)).abs().max()) < float((b - b.mean(0)).abs().max())


def test_bma_folds_what_the_node_mixed_on_the_public_copies(tiny_cfg):
    cfg = tiny_cfg.replace(num_nodes=3, topology="complete", compression="int4", bma="full")
    nodes = [rt.node for rt in build_nodes(cfg)]
    weights = {0: {"node 1": 1 / 3, "node 2": 1 / 3}, 1: {"node 0": 1 / 3, "node 2": 1 / 3},
               2: {"node 0": 1 / 3, "node 1": 1 / 3}}
    for node in nodes:
        node.start_block(1)
    for _ in range(2):  # the first exchange only fills the copies; the second is mixed
        for node in nodes:
            node.local_step()
        payloads = [node.publish() for node in nodes]
        for i, node in enumerate(nodes):
            for sender in weights[i]:
                node.receive(sender, payloads[int(sender[-1])])
        node = nodes[0]
        half = [m.detach().clone() for m in node.active.masters]
        mixed = node.public.mixed(node.active.masters, weights[0])
        h = node.optimizer.consensus_signal(mixed)
        m_before = [node.optimizer.adam.state[m]["exp_avg"].clone() for m in node.active.masters]
        for i, other in enumerate(nodes):
            other.apply_public_mix(weights[i])
    b1 = cfg.bma_beta1
    assert not all(torch.equal(a, b) for a, b in zip(half, mixed))  # the neighbours moved it
    for master, value, before, signal in zip(node.active.masters, mixed, m_before, h):
        assert torch.equal(master.detach(), value)
        torch.testing.assert_close(node.optimizer.adam.state[master]["exp_avg"], b1 * before + (1 - b1) * signal)


@pytest.mark.parametrize("compression", ["int8", "int4"])
def test_plan_predicts_the_public_copies_the_oracle_measures(tiny_cfg, compression):
    cfg = tiny_cfg.replace(num_nodes=4, topology="erdos_renyi", compression=compression, steps_per_block=3)
    nodes = trained(cfg)
    plan = make_plan(cfg)
    assert max(n.peak_public_bytes for n in nodes) == plan.public_copy_bytes
    # bytes: test_the_reference_counts_the_bytes_the_plan_predicts, and the Flower run's in test_flower_matches_reference.py


@pytest.mark.parametrize("compression", ["none", "int8", "int4"])
def test_the_reference_counts_the_bytes_the_plan_predicts(tiny_cfg, compression):
    cfg = tiny_cfg.replace(compression=compression, steps_per_block=3)  # the irregular graph: degrees 1, 2, 2, 3
    summary = run_reference_job(cfg, fast=True)
    plan = make_plan(cfg)
    assert summary["bytes_sent_per_node"] == pytest.approx(plan.bytes_per_node_run, rel=1e-12)
    if compression != "none":
        assert summary["bytes_sent_per_node"] < plan.uncompressed_bytes_per_node_run / 2


# sha256 of every node's parameters, in order, after the run of test_none_runs_the_uncompressed_gossip_bit_for_bit,
# as the gossip code without compression computes them (oracle and fast path; torch 2.13.0 CPU, x86_64;
# BMA with discrepancy='scaled'): compression='none' must not change a bit of it
UNCOMPRESSED_DIGESTS = {False: "a32b8400bdf60dd55df85734103b7ad11fc804d6565c77bd6994a28b0507c53e",
                        True: "d276a00b395f7644a47955f440464528bbfe64be7e6582f56cd168f8f743e27a"}


@pytest.mark.parametrize("fast", [False, True])
def test_none_runs_the_uncompressed_gossip_bit_for_bit(tiny_cfg, fast):
    cfg = tiny_cfg.replace(num_nodes=3, topology="ring", compression="none", discrepancy="scaled", bma_strength=1.0)
    nodes = trained(cfg, fast=fast)
    digest = hashlib.sha256()
    for node in nodes:
        assert node.choco is None and node.peak_public_bytes == 0
        for p in node.model.parameters():
            digest.update(p.detach().contiguous().numpy().tobytes())
    assert digest.hexdigest() == UNCOMPRESSED_DIGESTS[fast]
