"""ServerApp side: which partition each connected node holds, which nodes take part, and the
Metropolis-Hastings weights over them. Nodes that go silent or crash are dropped (W recomputed
over the rest); a dropped node that answers again rejoins at a block boundary with a live
neighbour's copy of the blocks trained so far."""

from __future__ import annotations

import logging
import time
from typing import Any

import networkx as nx
import numpy as np
from flwr.app import Message

from deca_flower.core.topology import metropolis_hastings
from deca_flower.flower.transport import CoordinationError, Transport
from deca_flower.protocol import messages as pm
from deca_flower.protocol.packing import record_bytes
from deca_flower.results import RunWriter

log = logging.getLogger(__name__)

HOLD_PAUSE_S = 1.0  # between rounds of rejoin probes while a split graph holds the run


class Membership:
    """The nodes of a run by partition id: who takes part, who was dropped or rejoined, and W.

    Parameters
    ----------
    transport : Transport
        How requests reach the nodes.
    writer : RunWriter
        Where dropout and rejoin records go.
    run_config : dict[str, Any]
        The run config (Flower's hyphenated keys), sent with every Setup and RejoinProbe.
    num_nodes : int
        Partitions 0..num_nodes-1; one node each.
    node_wait_s : float
        How long to wait for the nodes to connect.
    on_disconnect : str
        When dropouts split the graph: "stop", or "components" (gossip goes on within each).
    rejoin_probe_s : float
        At a block boundary, how long to wait for dropped nodes that may be back (0: no rejoin).
    disconnect_wait_s : float
        "stop" with rejoins possible: how long to hold at the block boundary, probing, for the graph to
        be whole again before stopping (until that boundary, gossip goes on within each component).
    """

    def __init__(self, transport: Transport, writer: RunWriter, run_config: dict[str, Any], num_nodes: int, *,
                 node_wait_s: float, on_disconnect: str, rejoin_probe_s: float, disconnect_wait_s: float = 0.0) -> None:
        self.transport, self.writer, self.run_config, self.num_nodes = transport, writer, run_config, num_nodes
        self.node_wait_s, self.on_disconnect, self.rejoin_probe_s = node_wait_s, on_disconnect, rejoin_probe_s
        self.disconnect_wait_s = disconnect_wait_s
        self.node_of: dict[int, int] = {}  # partition id -> Flower node id, of the nodes taking part
        self.dropped: dict[int, str] = {}  # partition id -> why
        self.rejoined: list[dict[str, int]] = []
        self.public_keys: dict[int, tuple[str, str]] = {}  # secure gossip: partition id -> (X25519 key, signature)
        self.half_bytes: list[int] = []  # per block: the size of every half a node may send (one model, one size)
        self.first_half_bytes: list[int] = []  # ... at a visit's first step (compressed gossip: its int8 payload)
        self.graph: nx.Graph | None = None  # once set, nodes that fail are dropped instead of stopping the run
        self.weights: np.ndarray | None = None

    # -- joining ------------------------------------------------------------------------------

    def wait_for_nodes(self, needed: int | None = None) -> list[int]:
        """The connected node ids, once `needed` (default: num_nodes) are there. More than num_nodes is
        refused: which of them would take part is not the coordinator's to guess."""
        needed = needed or self.num_nodes
        deadline = time.time() + self.node_wait_s
        while True:
            node_ids = self.transport.node_ids()
            if len(node_ids) > self.num_nodes:
                raise CoordinationError(f"{len(node_ids)} SuperNodes are connected but num-nodes={self.num_nodes}: "
                                        "stop the extra ones or set num-nodes to match")
            if len(node_ids) >= needed:
                return node_ids
            if time.time() > deadline:
                raise CoordinationError(
                    f"only {len(node_ids)} of {needed} SuperNodes (num-nodes={self.num_nodes}) connected within "
                    f"{self.node_wait_s:.0f}s (simulation: --federation-config 'num-supernodes={self.num_nodes}')")
            time.sleep(1.0)

    def set_up(self, node_ids: list[int], *, fresh: bool = True) -> dict[int, pm.NodeInfo]:
        """Send every node the run config (it loads model and data) and map node ids to partition ids."""
        replies = self.transport.send({nid: pm.Setup(self.run_config, fresh) for nid in node_ids})
        infos: dict[int, pm.NodeInfo] = {}
        for node_id in node_ids:
            if node_id not in replies or replies[node_id].has_error():
                raise CoordinationError(f"node {node_id} failed: " + (replies[node_id].error.reason if node_id in replies
                                        else f"no reply within reply-timeout-s={self.transport.reply_timeout_s}"))
            info = pm.NodeInfo.from_content(replies[node_id].content)
            pid = info.partition_id
            if pid in infos or not 0 <= pid < self.num_nodes:
                raise CoordinationError(f"node {node_id} reports partition-id {pid}: "
                                        f"partition ids must be unique and in 0..{self.num_nodes - 1}")
            infos[pid] = info
            self.node_of[pid] = node_id
            if info.public_key is not None:
                self.public_keys[pid] = (info.public_key, info.signature or "")
        sizes = {(tuple(info.first_half_bytes), tuple(info.half_bytes)) for info in infos.values()}
        if len(sizes) > 1:
            raise CoordinationError("nodes disagree on the size of their blocks' halves (not one model and config): "
                                    f"{({pid: (info.first_half_bytes, info.half_bytes) for pid, info in infos.items()})}")
        first, later = sizes.pop()
        self.first_half_bytes, self.half_bytes = list(first), list(later)
        names = {pid: info.label_names for pid, info in infos.items()}
        if self.run_config["task"] == "classify" and len({tuple(n) for n in names.values()}) > 1:
            raise CoordinationError(f"nodes disagree on the class names {names}; set labels='a,b,...' in the run "
                                    "config so every site numbers them the same way")
        return dict(sorted(infos.items()))

    # -- asking the nodes taking part ----------------------------------------------------------

    def ask(self, requests: dict[int, pm.Payload], step: int, *, dropouts: bool = True) -> dict[int, Message]:
        """Each partition's reply. Once the graph is set (and with `dropouts`), a node that fails or
        stays silent is dropped; otherwise the run stops, as it always does for a node that refused
        a neighbour's data."""
        dropouts = dropouts and self.graph is not None
        replies = self.transport.send({self.node_of[pid]: payload for pid, payload in requests.items()})
        answers, problems = {}, {}
        for pid in requests:
            reply = replies.get(self.node_of[pid])
            if reply is None:
                problems[pid] = f"no reply within reply-timeout-s={self.transport.reply_timeout_s}"
            elif reply.has_error():
                if not dropouts or reply.error.code in pm.REFUSED:  # bad data: never ignored
                    raise CoordinationError(f"node {self.node_of[pid]} failed: {reply.error.reason}")
                problems[pid] = f"failed: {reply.error.reason}"
            else:
                answers[pid] = reply
        if problems and not dropouts:
            raise CoordinationError(f"{len(problems)} of {len(requests)} nodes did not reply "
                                    f"within reply-timeout-s={self.transport.reply_timeout_s}")
        if problems:
            self.drop(problems, step)
        return dict(sorted(answers.items()))

    def drop(self, reasons: dict[int, str], step: int) -> None:
        """Take nodes out and recompute W over the rest."""
        for pid, why in reasons.items():
            log.warning("dropping node %d at step %d: %s", pid, step, why)
            self.writer.append({"kind": "dropout", "step": step, "node": pid, "reason": why})
            self.node_of.pop(pid, None)
            self.dropped[pid] = why
        self.reweight()

    def split(self) -> str | None:
        """Why the nodes taking part do not form one connected graph; None when they do."""
        alive = sorted(self.node_of)
        if len(alive) < 2:
            return f"fewer than 2 nodes left after dropouts {self.dropped}"
        remaining = self.graph.subgraph(alive)
        if not nx.is_connected(remaining):
            parts = [sorted(c) for c in nx.connected_components(remaining)]
            return f"after dropping {sorted(self.dropped)} the graph is disconnected (components {parts})"
        return None

    def holds_for_rejoins(self) -> bool:
        return self.on_disconnect == "stop" and self.disconnect_wait_s > 0 and self.rejoin_probe_s > 0

    def reweight(self) -> None:
        """Metropolis-Hastings weights over the nodes taking part (the others keep W[i, i] = 1). A split
        graph stops the run at once unless gossip goes on per component, or the coordinator is to
        hold for rejoins at the next block boundary."""
        problem = self.split()
        if problem and (not self.node_of or not (self.on_disconnect == "components" or self.holds_for_rejoins())):
            raise CoordinationError(f"{problem}; on-disconnect='components' would go on per component, "
                                    "disconnect-wait-s > 0 would wait for rejoins")
        if problem:
            log.warning("%s: gossip goes on within each component", problem)
        self.weights = metropolis_hastings(self.graph.subgraph(sorted(self.node_of)), size=self.num_nodes)

    def check_connected(self, visit: int) -> None:
        """At a block boundary: stop (the checkpoint of `visit` written) if the graph is still split
        and the run is not to go on per component."""
        problem = self.split()
        if problem and self.on_disconnect == "stop":
            raise CoordinationError(f"{problem}, still after probing for rejoins for disconnect-wait-s="
                                    f"{self.disconnect_wait_s:g}: stopped after visit {visit}; resume=true goes on "
                                    "from there once the nodes are back")

    # -- rejoining ----------------------------------------------------------------------------

    def may_rejoin(self, secure_gossip: bool) -> bool:
        # (secure gossip: the copy of the blocks would pass the relay in clear, so no rejoin)
        return bool(self.dropped) and self.rejoin_probe_s > 0 and not secure_gossip

    def rejoin(self, visit: int, visited_blocks: list[int], step: int) -> dict[int, int]:
        """Let dropped nodes that are back rejoin (`rejoin_once`); while the graph is split and the run
        is to hold for rejoins, probe again until disconnect-wait-s has passed. Returns the bytes each
        donor sent."""
        donated = self.rejoin_once(visit, visited_blocks, step)
        problem = self.split()
        if not (problem and self.holds_for_rejoins()):
            return donated
        log.warning("%s: holding after visit %d up to disconnect-wait-s=%g for dropped nodes to rejoin",
                    problem, visit, self.disconnect_wait_s)
        self.writer.append({"kind": "hold", "step": step, "after_visit": visit, "reason": problem})
        deadline = time.monotonic() + self.disconnect_wait_s
        while problem and time.monotonic() < deadline:
            time.sleep(min(HOLD_PAUSE_S, max(0.0, deadline - time.monotonic())))
            for donor, sent in self.rejoin_once(visit, visited_blocks, step).items():
                donated[donor] = donated.get(donor, 0) + sent
            problem = self.split()
        return donated

    def rejoin_once(self, visit: int, visited_blocks: list[int], step: int) -> dict[int, int]:
        """Probe the connected nodes not taking part; a dropped node that answers gets a live
        neighbour's copy of `visited_blocks` (one model transfer) and takes part from the next visit
        on. Returns the bytes each donor sent."""
        in_use = set(self.node_of.values())
        probes = {nid: pm.RejoinProbe(self.run_config) for nid in self.transport.node_ids() if nid not in in_use}
        back = {}
        for nid, reply in self.transport.send(probes, self.rejoin_probe_s).items():
            if reply.has_error():  # e.g. a node restarted mid-block under state-sync=block (StateLost)
                log.warning("rejoin probe: node %d answered with an error: %s", nid, reply.error.reason)
                continue
            pid = pm.NodeInfo.from_content(reply.content).partition_id
            if pid in self.dropped:
                back[pid] = nid
        donated: dict[int, int] = {}
        for pid, nid in back.items():
            alive = [j for j in self.graph.neighbors(pid) if j in self.node_of] or sorted(self.node_of)
            donor = alive[0]
            answered = self.ask({donor: pm.Donate(visited_blocks)}, step)
            if donor not in answered:
                continue
            blocks = pm.Donation.from_content(answered[donor].content).blocks
            replies = self.transport.send({nid: pm.Handover(visit, blocks)})
            if nid not in replies or replies[nid].has_error():
                log.warning("node %d answered but could not rejoin: %s", pid,
                            replies[nid].error.reason if nid in replies else "no reply")
                continue
            donated[donor] = donated.get(donor, 0) + record_bytes(blocks)
            self.node_of[pid] = nid
            del self.dropped[pid]
            self.rejoined.append({"node": pid, "after_visit": visit, "from": donor, "step": step})
            self.writer.append({"kind": "rejoin", "step": step, "node": pid, "from": donor, "blocks": visited_blocks,
                                "bytes": record_bytes(blocks)})
            log.warning("node %d rejoined after visit %d with node %d's copy of blocks %s", pid, visit, donor,
                        visited_blocks)
        if back:
            self.reweight()
        return donated
