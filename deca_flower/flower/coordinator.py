"""ServerApp side: a relay that never averages.

    wait for num-nodes SuperNodes -> ask each for its partition id (query) -> build the graph
    and Metropolis-Hastings W over partition ids -> for every inner step send each node ONLY
    its neighbours' half-step blocks of the previous step and the weights W[i, j] -> nodes mix,
    fold BMA and step -> collect their new half-step blocks -> ... -> evaluate, write results.

The coordinator handles blocks only as opaque records, except to measure the consensus
distance of what it relays (a metric; nothing it computes is sent back).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid

from deca_flower.config import DecaConfig
from deca_flower.core.schedule import build_schedule
from deca_flower.core.topology import metropolis_hastings, neighbours
from deca_flower.flower import records as rk
from deca_flower.flower.client import BAD_NEIGHBOUR_BLOCK
from deca_flower.flower.relay import confirm_after_push, pull_replies
from deca_flower.results import RunWriter, mean_std

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.json"
# Flower's send_and_receive sleeps 3 s between pulls (1.5 s per inner step on average); here 0.1 s, and
# 0.02 s for the simulation's LAST reply (the step ends with it; short looks all the time cost as much CPU as they saved)
PULL_INTERVAL_S = 0.1
LAST_REPLY_PULL_INTERVAL_S = 0.02


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
        self.rejoined: list[dict[str, int]] = []
        self.public_keys: dict[int, tuple[str, str]] = {}  # secure-gossip: signed X25519 key per node

    # -- setup ---------------------------------------------------------------------------

    def wait_for_nodes(self, needed: int | None = None) -> list[int]:
        """Up to num-nodes connected node ids, once `needed` (default: num-nodes) are there."""
        needed = needed or self.cfg.num_nodes
        deadline = time.time() + self.cfg.node_wait_s
        while True:
            node_ids = list(self.grid.get_node_ids())
            if len(node_ids) >= needed:
                return sorted(node_ids)[: self.cfg.num_nodes]
            if time.time() > deadline:
                raise CoordinationError(
                    f"only {len(node_ids)} of {needed} SuperNodes (num-nodes={self.cfg.num_nodes}) connected within "
                    f"{self.cfg.node_wait_s:.0f}s (simulation: --federation-config 'num-supernodes={self.cfg.num_nodes}')")
            time.sleep(1.0)

    def query_nodes(self, node_ids: list[int], *, fresh: bool = True) -> dict[int, dict[str, Any]]:
        """Map Flower node ids to partition ids; nodes load model and data while answering
        (fresh: and delete checkpoints an earlier attempt of this run left behind)."""
        messages = [self._message(nid, rk.QUERY, {rk.FRESH: fresh}) for nid in node_ids]
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
        names = {pid: list(info["label-names"]) for pid, info in infos.items()}
        if self.cfg.task == "classify" and len({tuple(n) for n in names.values()}) > 1:
            raise CoordinationError(f"nodes disagree on the class names {names}; set labels='a,b,...' in the run "
                                    "config so every site numbers them the same way")
        return infos

    # -- training ------------------------------------------------------------------------

    def train(self, weights: np.ndarray, num_blocks: int, steps_per_visit: int, evaluate_every: int,
              visits_done: int = 0) -> None:
        cfg, progress = self.cfg, self.progress
        self.weights = weights
        schedule = build_schedule(num_blocks, cfg.rounds, cfg.block_order, cfg.seed)
        total = len(schedule) * steps_per_visit
        unfinished: dict[str, Any] | None = None  # checkpoint of a visit whose finish rides on the next step
        saving: dict[str, Any] | None = None  # ... of a visit the nodes may still be saving in the background
        for visit in schedule[visits_done:]:
            losses: list[float] = []
            walls, computes, totals = [], [], []  # per inner step: wall time; slowest node's and all nodes'
            # forward + backward + Adam time (the critical path when nodes run side by side / one after another)
            for r in range(steps_per_visit):
                finish = unfinished["visit"] if unfinished and r == 0 else -1
                tic = time.time()
                metrics = self.exchange(self.weights, block=visit.block, start=(r == 0), finish=finish)
                walls.append(time.time() - tic)
                if saving:  # every node answered a message after the finish one: it waited for the save first
                    self._write_checkpoint({**saving, "dropped": self.dropped, "rejoined": self.rejoined})
                    saving = None
                if finish >= 0:
                    saving, unfinished = unfinished, None
                computes.append(max(m["step-s"] for m in metrics.values()))
                totals.append(sum(m["step-s"] for m in metrics.values()))
                losses.append(float(np.mean([m["loss"] for m in metrics.values()])))
                progress.peak_opt_bytes = max([progress.peak_opt_bytes, *(m["opt-bytes"] for m in metrics.values())])
            distance = self._consensus_distance()
            self.writer.append({"kind": "visit", "round": visit.round, "block": visit.block, "step": progress.step,
                                "loss_mean": float(np.mean(losses)), "consensus_distance": distance,
                                "bytes_sent_per_node": float(progress.bytes_sent.mean()),
                                "step_wall_s": float(np.mean(walls)), "step_compute_s": float(np.mean(computes)),
                                "step_compute_sum_s": float(np.mean(totals)),
                                "elapsed_s": time.time() - progress.started})
            log.info("round %d/%d block %d (%d/%d visits): loss %.4f, consensus distance %.3g, step %d/%d, %.0fs",
                     visit.round + 1, cfg.rounds, visit.block, visit.position + 1, len(schedule), np.mean(losses),
                     distance, progress.step, total, time.time() - progress.started)
            last = visit.position + 1 == len(schedule)
            evaluate = last or (evaluate_every and (visit.position + 1) % evaluate_every == 0)
            if not (evaluate or self._may_rejoin()):
                # the last mix of the visit goes with the next visit's first step: nodes mix, save the
                # finished block, start the next one (one message round per visit fewer)
                unfinished = self._checkpoint_state(visit.position)
                continue
            self.exchange(self.weights, block=-1, start=False, finish=visit.position)  # saved before the replies
            saving = None  # superseded by the checkpoint written below
            if evaluate:
                self.evaluate(list(self.node_of), visit.round, visit.block, final=last)
            if not last:
                self.rejoin(visit.position, sorted({v.block for v in schedule[: visit.position + 1]}))
            self._write_checkpoint(self._checkpoint_state(visit.position))

    def exchange(self, weights: np.ndarray, *, block: int, start: bool, finish: int = -1) -> dict[int, dict[str, float]]:
        """One inner step: relay each node its neighbours' previous halves; collect new halves.
        finish >= 0: after mixing, nodes finish their active block and save it as visit `finish`;
        block=-1: no step after that."""
        progress = self.progress
        instruction = {rk.STEP: progress.step, rk.MIX: bool(progress.halves), rk.BLOCK: block, rk.START: start,
                       rk.FINISH: finish}
        messages = []
        for pid, nid in self.node_of.items():
            records: dict[str, Any] = {}
            nbrs = neighbours(weights, pid)
            if self.cfg.secure_gossip:  # relayed as received; each node checks the signatures itself
                records[rk.KEYS] = ConfigRecord({f"{kind}.{j}": self.public_keys[j][n]
                                                 for j in nbrs for n, kind in enumerate(("pub", "sig"))})
            if progress.halves:
                mixing = {"self": float(weights[pid, pid])}
                for j, w in nbrs.items():
                    key = f"{rk.NEIGHBOUR_PREFIX}{j}"
                    sent = progress.halves[j]
                    records[key] = sent[f"{rk.SEALED_PREFIX}{pid}"] if self.cfg.secure_gossip else sent
                    mixing[key] = w
                records[rk.WEIGHTS] = ConfigRecord(mixing)
            messages.append(self._message(nid, rk.TRAIN, instruction, records))
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
        # replies come in any order: sorted by partition id, so means and the consensus distance
        # are summed in the same order in every run (a resumed run ends bit for bit equal)
        progress.halves = dict(sorted(halves.items()))
        if block >= 0:
            progress.step += 1
        return dict(sorted(metrics.items()))

    def _consensus_distance(self) -> float:
        if self.cfg.secure_gossip:  # the relay cannot read sealed blocks
            return float("nan")
        return rk.consensus_distance_of(self.progress.halves)

    # -- block boundaries: checkpoint and rejoin -------------------------------------------

    def _checkpoint_state(self, visit: int) -> dict[str, Any]:
        """Where the run stands at the end of `visit` (what `resume` needs)."""
        progress = self.progress
        return {"visit": visit, "step": progress.step, "bytes_sent": progress.bytes_sent.tolist(),
                "peak_opt_bytes": progress.peak_opt_bytes, "elapsed_s": time.time() - progress.started,
                "metrics_lines": self.writer.lines, "dropped": dict(self.dropped), "rejoined": list(self.rejoined)}

    def _write_checkpoint(self, state: dict[str, Any]) -> None:
        """Every node has finished and saved state["visit"]: record it (atomic)."""
        tmp = self.writer.run_dir / "checkpoint.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(self.writer.run_dir / CHECKPOINT)

    def _may_rejoin(self) -> bool:
        # (secure-gossip: the copy of the blocks would pass the relay in clear, so no rejoin)
        return bool(self.dropped) and self.cfg.rejoin_probe_s > 0 and not self.cfg.secure_gossip

    def resume(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: nodes that were taking part go back to their own
        checkpoint of that visit; nodes dropped by then stay out until they rejoin."""
        progress = self.progress
        progress.step, progress.peak_opt_bytes = int(state["step"]), float(state["peak_opt_bytes"])
        progress.bytes_sent = np.array(state["bytes_sent"], dtype=float)
        progress.started = time.time() - float(state["elapsed_s"])
        self.dropped = {int(k): v for k, v in state["dropped"].items()}
        self.rejoined = list(state["rejoined"])
        for pid in self.dropped:
            self.node_of.pop(pid, None)
        missing = sorted(set(range(self.cfg.num_nodes)) - set(self.node_of) - set(self.dropped))
        if missing:
            raise CoordinationError(f"cannot resume without partition(s) {missing}: they were taking part at the "
                                    f"checkpoint (only nodes dropped by then, {sorted(self.dropped)}, may be missing)")
        self._send([self._message(nid, rk.QUERY, {rk.RESUME_VISIT: int(state["visit"])})
                    for nid in self.node_of.values()])
        if self.dropped:
            self._reweight()

    def rejoin(self, visit: int, visited_blocks: list[int]) -> None:
        """A dropped node that answers again gets a live neighbour's copy of every block trained so
        far (one model transfer), then takes part from the next visit on."""
        if not self._may_rejoin():
            return
        in_use = set(self.node_of.values())
        probes = [self._message(nid, rk.QUERY) for nid in self.grid.get_node_ids() if nid not in in_use]
        back = {}
        for reply in send_and_receive(self.grid, probes, self.cfg.rejoin_probe_s):
            if reply.has_error():  # e.g. a node restarted mid-block under state-sync=block (StateLost)
                log.warning("rejoin probe: node %d answered with an error: %s", reply.metadata.src_node_id,
                            reply.error.reason)
                continue
            pid = int(reply.content[rk.NODE_INFO]["partition-id"])
            if pid in self.dropped:
                back[pid] = reply.metadata.src_node_id
        for pid, nid in back.items():
            alive = [j for j in self.graph.neighbors(pid) if j in self.node_of] or sorted(self.node_of)
            donor = alive[0]
            asked = self._message(self.node_of[donor], rk.QUERY, {rk.SEND_BLOCKS: visited_blocks})
            answered = self._send([asked], dropouts_allowed=True)
            if not answered:
                continue
            blocks = answered[0].content[rk.BLOCKS]
            handover = self._message(nid, rk.QUERY, {rk.VISIT: visit}, {rk.BLOCKS: blocks})
            replies = send_and_receive(self.grid, [handover], self.cfg.reply_timeout_s)
            if not replies or replies[0].has_error():
                log.warning("node %d answered but could not rejoin: %s", pid,
                            replies[0].error.reason if replies else "no reply")
                continue
            self.progress.bytes_sent[donor] += rk.record_bytes(blocks)
            self.node_of[pid] = nid
            del self.dropped[pid]
            self.rejoined.append({"node": pid, "after_visit": visit, "from": donor, "step": self.progress.step})
            self.writer.append({"kind": "rejoin", "step": self.progress.step, "node": pid, "from": donor,
                                "blocks": visited_blocks, "bytes": rk.record_bytes(blocks)})
            log.warning("node %d rejoined after visit %d with node %d's copy of blocks %s", pid, visit, donor,
                        visited_blocks)
        if back:
            self._reweight()

    # -- evaluation ----------------------------------------------------------------------

    def evaluate(self, partitions: list[int], round_: int, block: int, *, final: bool = False) -> dict[str, Any]:
        """Held-out metrics of each node (the final one also asks for generated samples)."""
        messages = [self._message(self.node_of[pid], rk.EVALUATE, {rk.SAMPLES: final}) for pid in partitions]
        replies = self._send(messages, dropouts_allowed=self.graph is not None)  # as in training
        if not replies:
            raise CoordinationError(f"no node answered the evaluation at step {self.progress.step}")
        per_node = {self._pid(r): dict(r.content[rk.METRICS]) for r in replies}
        samples = {self._pid(r): r.content[rk.SAMPLES] for r in replies if rk.SAMPLES in r.content}
        if samples:
            self.writer.write_samples({pid: list(zip(s["prompts"], s["answers"])) for pid, s in sorted(samples.items())})
        record: dict[str, Any] = {"kind": "eval", "round": round_, "block": block, "step": self.progress.step,
                                  "nodes": len(per_node), "bytes_sent_per_node": float(self.progress.bytes_sent.mean()),
                                  "elapsed_s": time.time() - self.progress.started}
        for key in self.cfg.headline:
            values = [per_node[p][key] for p in sorted(per_node)]
            record[f"{key}_mean"], record[f"{key}_std"] = mean_std(values)
            record[f"{key}_per_node"] = values
        self.writer.append(record)
        log.info("eval at step %d over %d node(s): %s", record["step"], record["nodes"],
                 ", ".join(f"{k} {record[k + '_mean']:.3f} +- {record[k + '_std']:.3f}" for k in self.cfg.headline))
        return record

    # -- plumbing ------------------------------------------------------------------------

    def _message(self, node_id: int, message_type: str, instruction: dict[str, Any] | None = None,
                 records: dict[str, Any] | None = None) -> Message:
        """To one node: the run config (every handler checks it), the instruction and any other records."""
        content = RecordDict({rk.CONFIG: self.config_record})
        if instruction is not None:
            content[rk.INSTRUCTION] = ConfigRecord(instruction)
        for key, record in (records or {}).items():
            content[key] = record
        return Message(content, dst_node_id=node_id, message_type=message_type)

    def _send(self, messages: list[Message], dropouts_allowed: bool = False) -> list[Message]:
        """Replies of every node; with dropouts_allowed, silent or crashed nodes are dropped instead."""
        sent_to: dict[str, int] = {}
        replies = send_and_receive(self.grid, messages, self.cfg.reply_timeout_s, sent_to)
        # a reply belongs to the node its message went to: the SuperLink's own error replies ("node
        # unavailable" after a SuperNode died) carry the SuperLink's node id as their source
        node_of_reply = [sent_to.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) for r in replies]
        problems = {m.metadata.dst_node_id: f"no reply within reply-timeout-s={self.cfg.reply_timeout_s}"
                    for m in messages if m.metadata.dst_node_id not in node_of_reply}
        for reply, node in zip(replies, node_of_reply):
            if reply.has_error():
                if not dropouts_allowed or reply.error.code == BAD_NEIGHBOUR_BLOCK:  # bad data: never ignored
                    raise CoordinationError(f"node {node} failed: {reply.error.reason}")
                problems[node] = f"failed: {reply.error.reason}"
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
        self._reweight()

    def _reweight(self) -> None:
        """Metropolis-Hastings weights over the nodes taking part (others keep W[i, i] = 1)."""
        assert self.graph is not None
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


def send_and_receive(grid: Grid, messages: list[Message], timeout: float,
                     sent_to: dict[str, int] | None = None) -> list[Message]:
    """Push, then pull the replies every PULL_INTERVAL_S until all are in or `timeout` passed;
    `sent_to` gets each pushed message id -> its destination node. (Grid.send_and_receive pauses 3 s.)"""
    pushed = list(grid.push_messages(messages))
    if len(pushed) != len(messages) or None in pushed:  # HttpGrid: [] on HTTP 413, None for a refused message
        refused = len(messages) - len([i for i in pushed if i is not None])
        raise CoordinationError(f"the SuperLink refused {refused} of {len(messages)} messages "
                                "(payload too large or malformed: see Flower's log above)")
    if sent_to is not None:
        sent_to.update(zip(pushed, (m.metadata.dst_node_id for m in messages)))
    pending = set(pushed)
    confirm_after_push(grid)
    deadline = time.monotonic() + timeout
    in_memory = isinstance(grid, InMemoryGrid)
    replies: list[Message] = []
    while pending:
        pulled = pull_replies(grid, pending)
        replies += pulled
        pending -= {reply.metadata.reply_to_message_id for reply in pulled}
        if pending and time.monotonic() < deadline:
            time.sleep(LAST_REPLY_PULL_INTERVAL_S if in_memory and len(pending) == 1 else PULL_INTERVAL_S)
        elif pending:
            break
    return replies
