"""Communication graphs (networkx), Metropolis-Hastings mixing weights, and their checks.

W[i,j] = 1 / (1 + max(deg i, deg j)) on each edge, W[i,i] = 1 - row sum: symmetric and doubly
stochastic on any undirected graph. The spectral gap 1 - |lambda_2(W)| says how fast gossip
mixes (ring: slow, complete: one step).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import networkx as nx
import numpy as np

TOPOLOGIES = ("ring", "erdos_renyi", "bipartite", "complete", "torus", "exponential")


class TopologyError(ValueError):
    """The graph cannot be built or cannot mix (disconnected, too few nodes, bad weights)."""


def ring(n: int, seed: int, edge_prob: float) -> nx.Graph:
    _need(n, 3, "ring")
    return nx.cycle_graph(n)


def erdos_renyi(n: int, seed: int, edge_prob: float) -> nx.Graph:
    """G(n, p), re-drawn with the next seed until connected (the paper's default graph)."""
    _need(n, 2, "erdos_renyi")
    for attempt in range(1000):
        graph = nx.erdos_renyi_graph(n, edge_prob, seed=seed + attempt)
        if nx.is_connected(graph):
            return graph
    raise TopologyError(f"no connected Erdos-Renyi graph with n={n}, p={edge_prob} in 1000 draws")


def bipartite(n: int, seed: int, edge_prob: float) -> nx.Graph:
    """Complete bipartite graph between the even and the odd nodes."""
    _need(n, 2, "bipartite")
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from((i, j) for i in range(0, n, 2) for j in range(1, n, 2))
    return graph


def complete(n: int, seed: int, edge_prob: float) -> nx.Graph:
    _need(n, 2, "complete")
    return nx.complete_graph(n)


def torus(n: int, seed: int, edge_prob: float) -> nx.Graph:
    """2-D wrap-around grid; n must be rows x cols with both >= 3 (e.g. 9, 12, 16)."""
    rows = next((r for r in range(int(math.isqrt(n)), 2, -1) if n % r == 0 and n // r >= 3), None)
    if rows is None:
        raise TopologyError(f"torus needs n = rows*cols with rows, cols >= 3; n={n} does not factor so")
    grid = nx.grid_2d_graph(rows, n // rows, periodic=True)
    return nx.convert_node_labels_to_integers(grid, ordering="sorted")


def exponential(n: int, seed: int, edge_prob: float) -> nx.Graph:
    """Node i links to i +- 2^k (mod n): log-degree, fast mixing."""
    _need(n, 2, "exponential")
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    hop = 1
    while hop < n:
        graph.add_edges_from((i, (i + hop) % n) for i in range(n) if (i + hop) % n != i)
        hop *= 2
    return graph


BUILDERS: dict[str, Callable[[int, int, float], nx.Graph]] = {
    "ring": ring, "erdos_renyi": erdos_renyi, "bipartite": bipartite,
    "complete": complete, "torus": torus, "exponential": exponential,
}


def build_graph(name: str, n: int, *, seed: int = 0, edge_prob: float = 0.5) -> nx.Graph:
    """The named graph on nodes 0..n-1, checked to be connected."""
    if name not in BUILDERS:
        raise TopologyError(f"unknown topology '{name}'; choose one of {list(TOPOLOGIES)}")
    graph = BUILDERS[name](n, seed, edge_prob)
    check_graph(graph)
    return graph


def check_graph(graph: nx.Graph) -> None:
    if graph.number_of_nodes() < 2:
        raise TopologyError("a gossip graph needs at least 2 nodes")
    if nx.number_of_selfloops(graph):
        raise TopologyError("graph has self loops; mixing weights handle the diagonal")
    if not nx.is_connected(graph):
        parts = [sorted(c) for c in nx.connected_components(graph)]
        raise TopologyError(f"graph is disconnected (components {parts}): nodes would never agree")


def metropolis_hastings(graph: nx.Graph, size: int | None = None) -> np.ndarray:
    """Mixing matrix W (size x size, float64) over nodes labelled 0..size-1 (default: the node count).

    Nodes absent from `graph` (e.g. dropped out) get W[k,k] = 1 and no edges."""
    n = size if size is not None else graph.number_of_nodes()
    weights = np.zeros((n, n))
    for i, j in graph.edges():
        weights[i, j] = weights[j, i] = 1.0 / (1 + max(graph.degree[i], graph.degree[j]))
    weights[np.diag_indices(n)] = 1.0 - weights.sum(axis=1)
    check_mixing_matrix(weights)
    return weights


def check_mixing_matrix(weights: np.ndarray, atol: float = 1e-12) -> None:
    """Refuse W unless square, symmetric, non-negative, with rows and columns summing to 1."""
    if weights.ndim != 2 or weights.shape[0] != weights.shape[1]:
        raise TopologyError(f"mixing matrix must be square, got shape {weights.shape}")
    if not np.allclose(weights, weights.T, rtol=0, atol=atol):  # absolute: numpy's default rtol would add 1e-5
        raise TopologyError("mixing matrix is not symmetric")
    if (weights < -atol).any():
        raise TopologyError("mixing matrix has negative entries")
    if not (np.allclose(weights.sum(0), 1, rtol=0, atol=atol) and np.allclose(weights.sum(1), 1, rtol=0, atol=atol)):
        raise TopologyError("mixing matrix is not doubly stochastic")


def spectral_gap(weights: np.ndarray) -> float:
    """1 - |lambda_2|, the second largest eigenvalue modulus of W (0 when W is disconnected)."""
    moduli = np.sort(np.abs(np.linalg.eigvalsh(weights)))[::-1]
    return float(1.0 - moduli[1])


def neighbours(weights: np.ndarray, node: int) -> dict[int, float]:
    """Node's neighbours with their weights (self excluded)."""
    return {int(j): float(w) for j, w in enumerate(weights[node]) if j != node and w > 0}


def _need(n: int, minimum: int, name: str) -> None:
    if n < minimum:
        raise TopologyError(f"topology '{name}' needs at least {minimum} nodes, got {n}")
