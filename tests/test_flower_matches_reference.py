"""The Flower path (real coordinator + ClientApp mod + handlers) equals the single-process reference."""

import json

import numpy as np
import pytest
import torch

from apps.client_app import app as client_app
from deca_flower.flower import state
from deca_flower.flower.job import run_deca
from deca_flower.paths import prepare_run
from deca_flower.plan import make_plan
from deca_flower.reference_run import build_nodes, run_reference_job
from tests.inprocess import InProcessGrid


def flower_run(cfg):
    state._WARM.clear()
    cfg, run_dir = prepare_run(cfg)
    grid = InProcessGrid(client_app, cfg.num_nodes)
    summary = run_deca(grid, cfg, run_dir)
    runtimes = {key[1] - 100: rt for key, rt in state._WARM.items()}
    return summary, run_dir, [runtimes[p] for p in range(cfg.num_nodes)]


def visit_lines(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["kind"] == "visit"]


def assert_flower_equals_reference(cfg):
    summary, run_dir, flower_nodes = flower_run(cfg)
    reference_nodes = build_nodes(cfg)
    reference_dir = run_dir.with_name(run_dir.name + "-reference")
    reference = run_reference_job(cfg, runtimes=reference_nodes, run_dir=reference_dir)
    for fl, ref in zip(flower_nodes, reference_nodes):
        for (name, p_fl), (_, p_ref) in zip(fl.node.model.named_parameters(), ref.node.model.named_parameters()):
            torch.testing.assert_close(p_fl, p_ref, rtol=1e-5, atol=1e-6, msg=name)
    assert summary["final"]["accuracy_mean"] == pytest.approx(reference["final"]["accuracy_mean"])
    flower_visits, reference_visits = visit_lines(run_dir), visit_lines(reference_dir)
    for key in ("step", "loss_mean", "consensus_distance"):  # both measure the halves of a visit's last step
        np.testing.assert_allclose([v[key] for v in flower_visits], [v[key] for v in reference_visits], rtol=1e-4,
                                   err_msg=key)
    return summary, run_dir, reference


@pytest.mark.parametrize("bma", ["full", "trivial", "none"])
def test_flower_blocks_equal_reference(tiny_cfg, bma):
    cfg = tiny_cfg.replace(bma=bma, rounds=2, block_order="random")  # the irregular 4-node graph of conftest
    summary, run_dir, reference = assert_flower_equals_reference(cfg)
    assert summary["inner_steps"] == reference["inner_steps"] == 2 * 3 * cfg.steps_per_block
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval" and e["block"] >= 0]
    assert [e["round"] for e in evals] == [0, 1]  # eval-every-blocks=0: at the end of each round


@pytest.mark.parametrize(("discrepancy", "strength"), [("raw", 1.0), ("normalized", 1.0), ("gradient", 3.0)])
def test_flower_blocks_equal_reference_for_each_consensus_signal(tiny_cfg, discrepancy, strength):
    # 'scaled' is the full-BMA case above; the others divide by lr or use Adam's step count differently
    assert_flower_equals_reference(tiny_cfg.replace(bma="full", discrepancy=discrepancy, bma_strength=strength))


@pytest.mark.parametrize(("compression", "state_sync"), [("int8", "block"), ("int4", "step")])
def test_flower_blocks_equal_reference_with_compressed_gossip(tiny_cfg, compression, state_sync):
    # the irregular 4-node graph; state-sync=step writes the public copies after every message
    cfg = tiny_cfg.replace(compression=compression, rounds=2, block_order="random", state_sync=state_sync)
    summary, _, _ = assert_flower_equals_reference(cfg)
    plan = make_plan(cfg)  # the payloads' records, as the relay counted them
    assert summary["bytes_sent_per_node"] == pytest.approx(plan.bytes_per_node_run, rel=1e-12)
    assert summary["bytes_sent_per_node"] < plan.uncompressed_bytes_per_node_run / 2


def test_run_folder_contents(tiny_cfg):
    summary, run_dir, _ = flower_run(tiny_cfg.replace(eval_every_blocks=1))
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "label_distribution.png", "accuracy.png"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[0]["nodes"] == 1 and evals[-1]["nodes"] == 4 and len(evals) == 1 + 3
    assert json.loads((run_dir / "summary.json").read_text())["inner_steps"] == summary["inner_steps"]
    assert summary["bytes_sent_per_node"] > 0


def test_gossip_preserves_network_average_with_lr_zero(tiny_cfg):
    cfg = tiny_cfg.replace(lr=0.0, bma="none", num_nodes=4, topology="ring")
    nodes = build_nodes(cfg)
    with torch.no_grad():  # make the nodes disagree, then gossip only
        for pid, rt in enumerate(nodes):
            torch.manual_seed(pid)
            for p in rt.node.model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    before = [torch.stack([dict(r.node.model.named_parameters())[n].detach().double() for r in nodes])
              for n, _ in nodes[0].node.model.named_parameters()]
    run_reference_job(cfg, runtimes=nodes)
    after = [torch.stack([dict(r.node.model.named_parameters())[n].detach().double() for r in nodes])
             for n, _ in nodes[0].node.model.named_parameters()]
    for b, a in zip(before, after):
        torch.testing.assert_close(a.mean(0), b.mean(0), rtol=0, atol=1e-6)  # fp32 model: rounding only
    spread = [float((a - a.mean(0)).abs().max()) / max(float((b - b.mean(0)).abs().max()), 1e-12)
              for b, a in zip(before, after)]
    assert np.max(spread) < 1.0  # and the nodes moved towards agreement


def test_oracle_and_fast_reference_agree(tiny_cfg):
    cfg = tiny_cfg.replace(num_nodes=4, topology="complete")
    slow, fast = build_nodes(cfg), build_nodes(cfg)
    run_reference_job(cfg, runtimes=slow)
    run_reference_job(cfg, runtimes=fast, fast=True)
    for a, b in zip(slow, fast):
        for pa, pb in zip(a.node.model.parameters(), b.node.model.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_fast_reference_keeps_bf16_nodes_fp32_masters_as_the_oracle_does(tiny_cfg):
    # bf16 weights, fp32 masters (the GPU layout): the one-matmul mix must use gossip.mix's
    # difference form too, or bf16 rounding of the halves lands in the masters and, / lr, in BMA
    from deca_flower.core.reference import run_reference
    from deca_flower.core.schedule import build_schedule
    from deca_flower.core.topology import build_graph, metropolis_hastings

    weights = metropolis_hastings(build_graph(tiny_cfg.topology, tiny_cfg.num_nodes, edge_prob=tiny_cfg.edge_prob))

    def masters_after_each_step(fast: bool) -> list[list[torch.Tensor]]:
        nodes = [rt.node for rt in build_nodes(tiny_cfg)]
        for node in nodes:
            node.model.to(torch.bfloat16)
        seen: list[list[torch.Tensor]] = []
        schedule = build_schedule(len(nodes[0].blocks), 1, "descending")[:2]
        run_reference(nodes, weights, schedule, 3, fast=fast,
                      on_step=lambda *_: seen.append([m.clone() for n in nodes for m in n.active.masters]))
        return seen

    oracle, fast = masters_after_each_step(False), masters_after_each_step(True)
    assert len(oracle) == len(fast) == 6
    for step_oracle, step_fast in zip(oracle, fast):
        for a, b in zip(step_oracle, step_fast):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
