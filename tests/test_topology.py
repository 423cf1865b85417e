import networkx as nx
import numpy as np
import pytest

from deca_flower.core.topology import (
    TOPOLOGIES,
    TopologyError,
    build_graph,
    check_graph,
    check_mixing_matrix,
    metropolis_hastings,
    spectral_gap,
)


@pytest.mark.parametrize("name", TOPOLOGIES)
@pytest.mark.parametrize("n", [9, 16])
def test_mixing_matrix_symmetric_doubly_stochastic(name, n):
    weights = metropolis_hastings(build_graph(name, n, seed=3, edge_prob=0.3))
    assert np.allclose(weights, weights.T, rtol=0, atol=1e-15)
    assert np.allclose(weights.sum(0), 1, rtol=0, atol=1e-12) and np.allclose(weights.sum(1), 1, rtol=0, atol=1e-12)
    assert (weights >= 0).all()
    assert 0 < spectral_gap(weights) <= 1 + 1e-12


def test_metropolis_hastings_hand_computed_path():
    # path 0-1-2: degrees 1,2,1 -> W01 = W12 = 1/3, diagonal fills the rows
    weights = metropolis_hastings(nx.path_graph(3))
    expected = np.array([[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])
    assert np.allclose(weights, expected)


def test_spectral_gap_orders_ring_below_complete():
    ring = spectral_gap(metropolis_hastings(build_graph("ring", 8)))
    er = spectral_gap(metropolis_hastings(build_graph("erdos_renyi", 8, edge_prob=0.5)))
    full = spectral_gap(metropolis_hastings(build_graph("complete", 8)))
    assert ring < er < full and full == pytest.approx(1.0)


def test_erdos_renyi_is_seeded_and_connected():
    a, b = build_graph("erdos_renyi", 10, seed=1, edge_prob=0.2), build_graph("erdos_renyi", 10, seed=1, edge_prob=0.2)
    assert sorted(a.edges()) == sorted(b.edges()) and nx.is_connected(a)


def test_disconnected_graph_is_refused():
    graph = nx.Graph([(0, 1), (2, 3)])
    with pytest.raises(TopologyError, match="disconnected"):
        check_graph(graph)


@pytest.mark.parametrize(("name", "n", "message"), [
    ("ring", 2, "at least 3"), ("torus", 7, "rows, cols >= 3"), ("star", 4, "unknown topology"),
])
def test_bad_topology_requests(name, n, message):
    with pytest.raises(TopologyError, match=message):
        build_graph(name, n)


def test_non_stochastic_matrix_is_refused():
    with pytest.raises(TopologyError, match="doubly stochastic"):
        check_mixing_matrix(np.array([[0.5, 0.5], [0.5, 0.4]]))
    with pytest.raises(TopologyError, match="symmetric"):
        check_mixing_matrix(np.array([[0.7, 0.3], [0.2, 0.8]]))
    with pytest.raises(TopologyError, match="doubly stochastic"):  # 2e-6 off: within numpy's default rtol of 1
        check_mixing_matrix(np.array([[0.5, 0.500002], [0.500002, 0.5]]))
    with pytest.raises(TopologyError, match="symmetric"):
        check_mixing_matrix(np.array([[0.5, 0.5 + 1e-9, 0.0], [0.5, 0.5, 1e-9], [0.0, 0.0, 1.0]]))
