"""Baselines on the same node machinery: equal local steps, Flower path == reference, what each trains."""

import pytest
import torch

from deca_flower.reference_run import build_nodes, run_reference_job
from tests.test_flower_matches_reference import flower_run


@pytest.mark.parametrize("method", ["deca-nobma", "dadam", "declora"])
def test_gossip_baselines_match_reference(tiny_cfg, method):
    cfg = tiny_cfg.replace(method=method)
    summary, _, flower_nodes = flower_run(cfg)
    reference_nodes = build_nodes(cfg)
    reference = run_reference_job(cfg, runtimes=reference_nodes)
    assert summary["inner_steps"] == reference["inner_steps"] == 3 * cfg.steps_per_block  # T*B*R for every method
    for fl, ref in zip(flower_nodes, reference_nodes):
        for (name, a), b in zip(fl.node.model.named_parameters(), ref.node.model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_declora_trains_only_adapters_and_dadam_holds_full_state(tiny_cfg):
    lora_nodes = build_nodes(tiny_cfg.replace(method="declora"))
    base = {n: p.clone() for n, p in lora_nodes[0].node.model.named_parameters() if "lora_" not in n}
    run_reference_job(tiny_cfg.replace(method="declora"), runtimes=lora_nodes)
    for name, param in lora_nodes[0].node.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base[name]), name
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in lora_nodes[0].node.model.named_parameters())
    deca, dadam = build_nodes(tiny_cfg), build_nodes(tiny_cfg.replace(method="dadam"))
    run_reference_job(tiny_cfg, runtimes=deca)
    run_reference_job(tiny_cfg.replace(method="dadam"), runtimes=dadam)
    assert dadam[0].node.peak_optimizer_bytes > 1.5 * deca[0].node.peak_optimizer_bytes


def test_fedavg_uses_flowers_strategy_end_to_end(tiny_cfg):
    from apps.client_app import app as client_app
    from deca_flower.flower import state
    from deca_flower.flower.fedavg import run_fedavg
    from deca_flower.paths import prepare_run
    from tests.inprocess import InProcessGrid

    state._WARM.clear()
    cfg, run_dir = prepare_run(tiny_cfg.replace(method="fedavg"))
    summary = run_fedavg(InProcessGrid(client_app, cfg.num_nodes), cfg, run_dir)
    assert summary["method"] == "fedavg" and summary["inner_steps"] == 3 * tiny_cfg.steps_per_block
    assert 0 <= summary["final"]["accuracy_mean"] <= 1 and (run_dir / "summary.json").is_file()
    from deca_flower.plan import make_plan  # the tied LM head travels once, in fp32: payload bytes exactly as planned

    assert summary["bytes_sent_per_node"] == make_plan(tiny_cfg).fedavg_bytes_per_node_run


@pytest.mark.parametrize("method", ["deca", "deca-trivial", "dadam"])
def test_planned_optimizer_bytes_are_what_the_nodes_hold(tiny_cfg, method):
    from deca_flower.plan import make_plan

    cfg = tiny_cfg.replace(method=method)
    nodes = build_nodes(cfg)
    run_reference_job(cfg, runtimes=nodes)
    plan = make_plan(cfg)
    planned = plan.full_adam_optimizer_bytes if method == "dadam" else plan.deca_optimizer_bytes
    assert max(n.node.peak_optimizer_bytes for n in nodes) == planned
