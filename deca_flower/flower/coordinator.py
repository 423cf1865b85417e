"""ServerApp side: a relay that never averages.

    wait for num-nodes SuperNodes -> ask each for its partition id (query) -> build the graph
    and Metropolis-Hastings W over partition ids -> for every inner step send each node ONLY
    its neighbours' half-step blocks of the previous step and the weights W[i, j] -> nodes mix,
    fold BMA and step -> collect their new half-step blocks -> ... -> evaluate, write results.

The coordinator handles blocks only as opaque records, except to measure the consensus
distance of what it relays (a metric; nothing it computes is sent back).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from deca_flower.config import DecaConfig
from deca_flower.core.reference import consensus_distance
from deca_flower.core.schedule import build_schedule
from deca_flower.core.topology import build_graph, metropolis_hastings, neighbours, spectral_gap
from deca_flower.flower import records as rk
from deca_flower.flower.client import BAD_NEIGHBOUR_BLOCK
from deca_flower.results import RunWriter, mean_std

log = logging.getLogger(__name__)


class CoordinationError(RuntimeError):
    """Nodes missing, duplicated partitions, or a node answered with an error."""


@dataclass
class _Progress:
    step: int = 0
    bytes_sent: np.ndarray = field(default_factory=lambda: np.zeros(0))
    halves: dict[int, Any] = field(default_factory=dict)  # ArrayRecord, or {receiver key: sealed record}
    peak_opt_bytes: float = 0.0
    started: float = field(default_factory=time.time)


class Coordinator:
    """Run one DECA job over the nodes connected to `grid`.

    Parameters
    ----------
    grid : Grid
        Flower's message grid (simulation or deployment).
    cfg : DecaConfig
        The resolved run configuration; sent to every node with every message.
    writer : RunWriter
        Where metrics, summary and plots go.
    """

    def __init__(self, grid: Grid, cfg: DecaConfig, writer: RunWriter) -> None:
        self.grid = grid
        self.cfg = cfg
        self.writer = writer
        self.config_record = ConfigRecord(cfg.to_run_config())
        self.node_of: dict[int, int] = {}  # partition id -> Flower node id (nodes still taking part)
        self.progress = _Progress(bytes_sent=np.zeros(cfg.num_nodes))
        self.graph: nx.Graph | None = None  # set by run_deca; needed to re-weight after a dropout
        self.weights: np.ndarray | None = None
        self.dropped: dict[int, str] = {}
        self.public_keys: dict[int, tuple[str, str]] = {}  # secure-gossip: signed X25519 key per node

    # -- setup ---------------------------------------------------------------------------

    def wait_for_nodes(self) -> list[int]:
        deadline = time.time() + self.cfg.node_wait_s
        while True:
            node_ids = list(self.grid.get_node_ids())
            if len(node_ids) >= self.cfg.num_nodes:
                return sorted(node_ids)[: self.cfg.num_nodes]
            if time.time() > deadline:
                raise CoordinationError(
                    f"only {len(node_ids)} of num-nodes={self.cfg.num_nodes} SuperNodes connected within "
                    f"{self.cfg.node_wait_s:.0f}s (simulation: --federation-config 'num-supernodes={self.cfg.num_nodes}')")
            time.sleep(1.0)

    def query_nodes(self, node_ids: list[int]) -> dict[int, dict[str, Any]]:
        """Map Flower node ids to partition ids; nodes load model and data while answering."""
        messages = [Message(RecordDict({rk.CONFIG: self.config_record}), dst_node_id=nid,
                            message_type=rk.QUERY) for nid in node_ids]
        infos: dict[int, dict[str, Any]] = {}
        for reply in self._send(messages):
            info = dict(reply.content[rk.NODE_INFO])
            pid = int(info["partition-id"])
            if pid in infos or not 0 <= pid < self.cfg.num_nodes:
                raise CoordinationError(f"node {reply.metadata.src_node_id} reports partition-id {pid}: "
                                        f"partition ids must be unique and in 0..{self.cfg.num_nodes - 1}")
            infos[pid] = info
            self.node_of[pid] = reply.metadata.src_node_id
            if "x25519" in info:
                self.public_keys[pid] = (str(info["x25519"]), str(info["signature"]))
        return infos

    # -- training ------------------------------------------------------------------------

    def train(self, weights: np.ndarray, num_blocks: int, steps_per_visit: int, evaluate_every: int) -> None:
        cfg, progress = self.cfg, self.progress
        self.weights = weights
        progress.started = time.time()  # elapsed_s in metrics counts training, not node setup
        schedule = build_schedule(num_blocks, cfg.rounds, cfg.block_order, cfg.seed)
        total = len(schedule) * steps_per_visit
        for visit in schedule:
            losses: list[float] = []
            for r in range(steps_per_visit):
                metrics = self.exchange(self.weights, block=visit.block, start=(r == 0))
                losses.append(float(np.mean([m["loss"] for m in metrics.values()])))
                progress.peak_opt_bytes = max([progress.peak_opt_bytes, *(m["opt-bytes"] for m in metrics.values())])
            distance = (float("nan") if cfg.secure_gossip  # the relay cannot read sealed blocks
                        else consensus_distance([rk.record_to_block(h, "relay") for h in progress.halves.values()]))
            self.writer.append({"kind": "visit", "round": visit.round, "block": visit.block, "step": progress.step,
                                "loss_mean": float(np.mean(losses)), "consensus_distance": distance,
                                "bytes_sent_per_node": float(progress.bytes_sent.mean()),
                                "elapsed_s": time.time() - progress.started})
            log.info("round %d/%d block %d (%d/%d visits): loss %.4f, consensus distance %.3g, step %d/%d, %.0fs",
                     visit.round + 1, cfg.rounds, visit.block, visit.position + 1, len(schedule), np.mean(losses),
                     distance, progress.step, total, time.time() - progress.started)
            last = visit.position + 1 == len(schedule)
            if last or (evaluate_every and (visit.position + 1) % evaluate_every == 0):
                self.exchange(self.weights, block=-1, start=False)  # finish the mixing before scoring
                self.evaluate(list(self.node_of), visit.round, visit.block)

    def exchange(self, weights: np.ndarray, *, block: int, start: bool) -> dict[int, dict[str, float]]:
        """One inner step: relay each node its neighbours' previous halves; collect new halves."""
        progress = self.progress
        instruction = ConfigRecord({rk.STEP: progress.step, rk.MIX: bool(progress.halves),
                                    rk.BLOCK: block, rk.START: start})
        messages = []
        for pid, nid in self.node_of.items():
            content = RecordDict({rk.CONFIG: self.config_record, rk.INSTRUCTION: instruction})
            nbrs = neighbours(weights, pid)
            if self.cfg.secure_gossip:  # relayed as received; each node checks the signatures itself
                content[rk.KEYS] = ConfigRecord({f"{kind}.{j}": self.public_keys[j][n]
                                                 for j in nbrs for n, kind in enumerate(("pub", "sig"))})
            if progress.halves:
                mixing = {"self": float(weights[pid, pid])}
                for j, w in nbrs.items():
                    key = f"{rk.NEIGHBOUR_PREFIX}{j}"
                    sent = progress.halves[j]
                    content[key] = sent[f"{rk.SEALED_PREFIX}{pid}"] if self.cfg.secure_gossip else sent
                    mixing[key] = w
                content[rk.WEIGHTS] = ConfigRecord(mixing)
            messages.append(Message(content, dst_node_id=nid, message_type=rk.TRAIN))
        halves, metrics = {}, {}
        for reply in self._send(messages, dropouts_allowed=self.graph is not None):
            pid = self._pid(reply)
            if rk.METRICS in reply.content:
                metrics[pid] = dict(reply.content[rk.METRICS])
            if rk.HALF in reply.content:
                halves[pid] = reply.content[rk.HALF]
                progress.bytes_sent[pid] += rk.record_bytes(halves[pid]) * len(neighbours(weights, pid))
            sealed = {k: r for k, r in reply.content.array_records.items() if k.startswith(rk.SEALED_PREFIX)}
            if sealed:  # opaque to the relay: one ciphertext per neighbour
                halves[pid] = sealed
                progress.bytes_sent[pid] += sum(rk.record_bytes(r) for r in sealed.values())
            if rk.EXCLUDED in reply.content:
                for reason in reply.content[rk.EXCLUDED]["senders"]:
                    log.warning("step %d: node %d excluded %s", progress.step, pid, reason)
                    self.writer.append({"kind": "excluded", "step": progress.step, "node": pid, "reason": reason})
        progress.halves = halves
        if block >= 0:
            progress.step += 1
        return metrics

    # -- evaluation ----------------------------------------------------------------------

    def evaluate(self, partitions: list[int], round_: int, block: int) -> dict[str, Any]:
        messages = [Message(RecordDict({rk.CONFIG: self.config_record}), dst_node_id=self.node_of[pid],
                            message_type=rk.EVALUATE) for pid in partitions]
        per_node = {self._pid(r): dict(r.content[rk.METRICS]) for r in self._send(messages)}
        record: dict[str, Any] = {"kind": "eval", "round": round_, "block": block, "step": self.progress.step,
                                  "nodes": len(per_node), "bytes_sent_per_node": float(self.progress.bytes_sent.mean()),
                                  "elapsed_s": time.time() - self.progress.started}
        for key in ("accuracy", "macro_f1"):
            values = [per_node[p][key] for p in sorted(per_node)]
            record[f"{key}_mean"], record[f"{key}_std"] = mean_std(values)
            record[f"{key}_per_node"] = values
        self.writer.append(record)
        log.info("eval at step %d over %d node(s): accuracy %.3f +- %.3f, macro-F1 %.3f +- %.3f",
                 record["step"], record["nodes"], record["accuracy_mean"], record["accuracy_std"],
                 record["macro_f1_mean"], record["macro_f1_std"])
        return record

    # -- plumbing ------------------------------------------------------------------------

    def _send(self, messages: list[Message], dropouts_allowed: bool = False) -> list[Message]:
        """Replies of every node; with dropouts_allowed, silent or crashed nodes are dropped instead."""
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.reply_timeout_s))
        answered = {r.metadata.src_node_id for r in replies}
        problems = {m.metadata.dst_node_id: f"no reply within reply-timeout-s={self.cfg.reply_timeout_s}"
                    for m in messages if m.metadata.dst_node_id not in answered}
        for reply in replies:
            if reply.has_error():
                if not dropouts_allowed or reply.error.code == BAD_NEIGHBOUR_BLOCK:  # bad data: never ignored
                    raise CoordinationError(f"node {reply.metadata.src_node_id} failed: {reply.error.reason}")
                problems[reply.metadata.src_node_id] = f"failed: {reply.error.reason}"
        if problems and not dropouts_allowed:
            raise CoordinationError(f"{len(problems)} of {len(messages)} nodes did not reply "
                                    f"within reply-timeout-s={self.cfg.reply_timeout_s}")
        if problems:
            self._drop({self._pid_of_node(nid): why for nid, why in problems.items()})
        return [r for r in replies if not r.has_error()]

    def _drop(self, reasons: dict[int, str]) -> None:
        """Remove nodes from the graph and recompute Metropolis-Hastings weights over the rest."""
        assert self.graph is not None
        for pid, why in reasons.items():
            log.warning("dropping node %d at step %d: %s", pid, self.progress.step, why)
            self.writer.append({"kind": "dropout", "step": self.progress.step, "node": pid, "reason": why})
            self.node_of.pop(pid, None)
            self.progress.halves.pop(pid, None)
            self.dropped[pid] = why
        alive = sorted(self.node_of)
        if len(alive) < 2:
            raise CoordinationError(f"fewer than 2 nodes left after dropouts {self.dropped}")
        remaining = self.graph.subgraph(alive)
        if not nx.is_connected(remaining):
            parts = [sorted(c) for c in nx.connected_components(remaining)]
            if self.cfg.on_disconnect == "stop":
                raise CoordinationError(f"after dropping {sorted(self.dropped)} the graph is disconnected "
                                        f"(components {parts}); on-disconnect='components' would go on per component")
            log.warning("graph split into components %s: gossip goes on within each", parts)
        self.weights = metropolis_hastings(remaining, size=self.cfg.num_nodes)

    def _pid(self, reply: Message) -> int:
        return self._pid_of_node(reply.metadata.src_node_id)

    def _pid_of_node(self, node_id: int) -> int:
        return next(pid for pid, nid in self.node_of.items() if nid == node_id)


def run_deca(grid: Grid, cfg: DecaConfig, run_dir: Path) -> dict[str, Any]:
    """The whole job; returns the summary that is also written to run_dir/summary.json."""
    from deca_flower.results import plot_label_distribution
    from deca_flower.runtime import partitioner_for

    writer = RunWriter(run_dir)
    writer.write_config(cfg.to_run_config())
    coordinator = Coordinator(grid, cfg, writer)
    started = time.time()
    log.info("waiting for %d nodes", cfg.num_nodes)
    infos = coordinator.query_nodes(coordinator.wait_for_nodes())
    graph = build_graph(cfg.topology, cfg.num_nodes, seed=cfg.seed, edge_prob=cfg.edge_prob)
    weights = metropolis_hastings(graph)
    coordinator.graph = graph
    gap = spectral_gap(weights)
    num_blocks, steps_per_visit = int(infos[0]["num-blocks"]), int(infos[0]["steps-per-visit"])
    log.info("%d nodes ready in %.0fs; %s graph with %d edges, spectral gap %.3f; %d blocks x %d steps x %d rounds",
             cfg.num_nodes, time.time() - started, cfg.topology, graph.number_of_edges(), gap, num_blocks,
             steps_per_visit, cfg.rounds)
    plot_label_distribution(partitioner_for(cfg), run_dir, f"{cfg.partitioner} split over {cfg.num_nodes} nodes")
    initial = coordinator.evaluate([0], 0, -1) if cfg.eval_initial else None
    coordinator.train(weights, num_blocks, steps_per_visit, cfg.eval_every_blocks)
    final = writer.evaluations[-1]
    summary = {
        "method": cfg.method, "model": cfg.model, "dataset": cfg.dataset, "num_nodes": cfg.num_nodes,
        "topology": cfg.topology, "edges": sorted(map(list, graph.edges())), "spectral_gap": gap,
        "num_blocks": num_blocks, "inner_steps": coordinator.progress.step,
        "final": {k: final[k] for k in final if k.startswith(("accuracy", "macro_f1"))},
        "initial": None if initial is None else {"accuracy": initial["accuracy_mean"], "macro_f1": initial["macro_f1_mean"]},
        "bytes_sent_per_node": float(coordinator.progress.bytes_sent.mean()),
        "peak_optimizer_bytes_per_node": coordinator.progress.peak_opt_bytes,
        "wall_time_s": time.time() - started,
        "label_counts": {pid: infos[pid]["label-counts"] for pid in sorted(infos)},
        "dropped_nodes": coordinator.dropped,
    }
    writer.write_summary(summary)
    writer.plot_accuracy(f"DECA ({cfg.bma} BMA) on {cfg.dataset}, {cfg.num_nodes} nodes, {cfg.topology}")
    log.info("done in %.0fs: accuracy %.3f +- %.3f (untrained %.3f); results in %s", summary["wall_time_s"],
             final["accuracy_mean"], final["accuracy_std"], summary["initial"]["accuracy"] if initial else float("nan"),
             run_dir)
    return summary
