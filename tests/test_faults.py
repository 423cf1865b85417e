"""Fault injection: nodes that go silent or crash are dropped, W is recomputed over the rest."""

import json

import pytest

from apps.client_app import app as client_app
from deca_flower.core.topology import check_mixing_matrix
from deca_flower.flower import state
from deca_flower.flower.coordinator import CoordinationError, Coordinator
from deca_flower.paths import prepare_run
from deca_flower.results import RunWriter
from tests.inprocess import InProcessGrid


def run_with_faults(cfg, silent=None, crash=None):
    from deca_flower.flower.coordinator import run_deca

    state._WARM.clear()
    cfg, run_dir = prepare_run(cfg)
    grid = InProcessGrid(client_app, cfg.num_nodes)
    grid.silent_after = {100 + pid: n for pid, n in (silent or {}).items()}
    grid.crash_after = {100 + pid: n for pid, n in (crash or {}).items()}
    summary = run_deca(grid, cfg, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, records


def test_silent_node_is_dropped_and_the_rest_finish(tiny_cfg):
    summary, records = run_with_faults(tiny_cfg.replace(num_nodes=5, topology="ring"), silent={2: 3})
    assert list(summary["dropped_nodes"]) == [2] and "no reply" in summary["dropped_nodes"][2]
    assert [r["node"] for r in records if r["kind"] == "dropout"] == [2]
    assert summary["final"]["accuracy_per_node"] and len(summary["final"]["accuracy_per_node"]) == 4


def test_crashed_node_is_dropped_too(tiny_cfg):
    summary, _ = run_with_faults(tiny_cfg.replace(num_nodes=5, topology="ring"), crash={4: 2})
    assert list(summary["dropped_nodes"]) == [4] and "simulated crash" in summary["dropped_nodes"][4]


def test_split_graph_stops_or_goes_on_per_component(tiny_cfg):
    cfg = tiny_cfg.replace(num_nodes=5, topology="ring")
    with pytest.raises(CoordinationError, match=r"disconnected \(components \[\[0, 4\], \[2\]\]\)"):
        run_with_faults(cfg, silent={1: 2, 3: 2})
    summary, _ = run_with_faults(cfg.replace(on_disconnect="components"), silent={1: 2, 3: 2})
    assert sorted(summary["dropped_nodes"]) == [1, 3] and len(summary["final"]["accuracy_per_node"]) == 3


def test_weights_after_dropout_are_doubly_stochastic_over_survivors(tiny_cfg, tmp_path):
    import networkx as nx

    from deca_flower.core.topology import metropolis_hastings

    state._WARM.clear()
    cfg, run_dir = prepare_run(tiny_cfg.replace(num_nodes=4, topology="complete"))
    coordinator = Coordinator(InProcessGrid(client_app, 4), cfg, RunWriter(run_dir))
    coordinator.query_nodes(coordinator.wait_for_nodes())
    coordinator.graph = nx.complete_graph(4)
    coordinator.weights = metropolis_hastings(coordinator.graph)
    coordinator._drop({1: "test"})
    w = coordinator.weights
    check_mixing_matrix(w)
    assert w[1, 1] == 1.0 and w[1].sum() == 1.0 and w[0, 2] == pytest.approx(1 / 3)
