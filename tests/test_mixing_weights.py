"""A node checks the mixing weights the relay sends against the Metropolis-Hastings weights of the
graph it knows (core/gossip.check_mixing_weights), before anything is mixed."""

import math

import networkx as nx
import pytest
import torch

from deca_flower.core.gossip import MixingWeightsError, check_mixing_weights, mix
from deca_flower.core.topology import build_graph, metropolis_hastings, neighbours


def sent_to(weights, node):
    """What the coordinator sends `node`: its self weight and {neighbour: W[node, j]}."""
    return float(weights[node, node]), neighbours(weights, node)


@pytest.mark.parametrize(("name", "n"), [("ring", 5), ("erdos_renyi", 6), ("complete", 4), ("torus", 9),
                                         ("exponential", 7), ("bipartite", 4)])
def test_the_coordinators_weights_are_accepted_by_every_node(name, n):
    graph = build_graph(name, n, seed=3, edge_prob=0.4)
    weights = metropolis_hastings(graph)
    for node in range(n):
        check_mixing_weights(node, *sent_to(weights, node), graph)


def test_weights_after_a_dropout_match_the_graph_without_the_dropped_node():
    graph = build_graph("complete", 4)
    alive = graph.subgraph([0, 1, 3])  # node 2 dropped out: W over the others, as the coordinator recomputes it
    weights = metropolis_hastings(alive, size=4)
    for node in (0, 1, 3):
        check_mixing_weights(node, *sent_to(weights, node), alive)
    with pytest.raises(MixingWeightsError, match=r"no weights for its neighbours \[2\]"):  # the node was not told
        check_mixing_weights(0, *sent_to(weights, 0), graph)
    with pytest.raises(MixingWeightsError, match="node 2 is not in the graph it knows"):
        check_mixing_weights(2, 1.0, {}, alive)


def test_forged_weights_that_sum_to_one_are_refused():
    graph = nx.cycle_graph(4)  # W[i, i] = W[i, i +- 1] = 1/3
    # self -1e4, neighbour 1e4 + 1: mix() accepts them (they sum to 1), and a neighbour 0.01 away moves the
    # node by 100, where honest weights move it by at most 0.01
    own, neighbour = torch.ones(3), torch.full((3,), 1.01)
    amplified = mix([own], -1e4, [(1e4 + 1, [neighbour]), (0.0, [own])])[0]
    assert float(amplified[0] - own[0]) == pytest.approx((1e4 + 1) * 0.01, rel=1e-4)
    with pytest.raises(MixingWeightsError, match=r"negative or not finite numbers: \{0: -10000.0\}"):
        check_mixing_weights(0, -1e4, {1: 1e4 + 1, 3: 0.0}, graph)
    with pytest.raises(MixingWeightsError, match=r"differ from the Metropolis-Hastings weights .*1: \(0.5, 0.333"):
        check_mixing_weights(0, 1 / 6, {1: 0.5, 3: 1 / 3}, graph)


@pytest.mark.parametrize(("self_weight", "others", "message"), [
    (1 / 3, {1: 1 / 3, 2: 1 / 3}, r"weights for nodes \[2\] that are not its neighbours and no weights for its "
                                  r"neighbours \[3\]"),  # a block re-routed through a non-neighbour
    (2 / 3, {1: 1 / 3}, r"no weights for its neighbours \[3\]"),
    (1 / 3, {1: 1 / 3, 3: 1 / 3, 0: 0.0}, "a neighbour weight for itself"),
    (math.nan, {1: 1 / 3, 3: 1 / 3}, "not finite"),
    (1 / 3, {1: math.inf, 3: 1 / 3}, "not finite"),
    (1 / 3, {1: "1/3", 3: 1 / 3}, "not finite numbers"),
], ids=["re-routed", "missing neighbour", "self as neighbour", "nan", "inf", "not a number"])
def test_malformed_weights_are_refused_naming_what_is_wrong(self_weight, others, message):
    with pytest.raises(MixingWeightsError, match=message):
        check_mixing_weights(0, self_weight, others, nx.cycle_graph(4))


# -- on the node: the gossip mod refuses what a hostile relay sends --------------------------

def test_a_relay_that_forges_or_reroutes_weights_is_refused_by_the_node(tiny_cfg, tmp_path):
    """The irregular graph 0-3, 1-2, 1-3, 2-3: the relay inflates node 0's weight for node 3 (self
    -1e4, neighbour 1e4 + 1: they sum to 1), then routes node 1's block to node 0 instead."""
    from deca_flower.flower.transport import CoordinationError
    from tests.test_bad_input import started_coordinator, warm_runtime

    coordinator, grid = started_coordinator(tiny_cfg, tmp_path)
    coordinator.exchange(block=1, start=True)
    before = {k: v.clone() for k, v in warm_runtime(coordinator, grid, 0).node.block_values().items()}
    honest = coordinator.membership.weights.copy()
    forged = honest.copy()
    forged[0, 0], forged[0, 3] = -1e4, 1e4 + 1
    coordinator.membership.weights = forged
    with pytest.raises(CoordinationError, match=r"node 0: refused the mixing weights the relay sent: .*negative"):
        coordinator.exchange(block=1, start=False)
    rerouted = honest.copy()
    rerouted[0, 1] = rerouted[0, 3] = honest[0, 3] / 2  # still sums to 1, all non-negative
    coordinator.membership.weights = rerouted
    with pytest.raises(CoordinationError, match=r"node 0: .*weights for nodes \[1\] that are not its neighbours"):
        coordinator.exchange(block=1, start=False)
    after = warm_runtime(coordinator, grid, 0).node.block_values()
    assert all(torch.equal(after[k], before[k]) for k in before)  # nothing was mixed in
