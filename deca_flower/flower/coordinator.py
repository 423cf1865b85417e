"""ServerApp side: DECA's visit loop, a relay that never averages.

    for every block visit of the schedule, for every inner step: send each node ONLY its
    neighbours' half-step blocks of the previous step and the weights W[i, j] -> nodes mix, fold
    BMA and step -> collect their new half-step blocks -> ... -> at block boundaries: checkpoint,
    evaluate, let dropped nodes rejoin.

Who takes part and W live in membership.py, the checkpoint file in checkpoints.py, the messages
in transport.py. The coordinator handles blocks only as opaque records, except to measure the
consensus distance of what it relays (a metric; nothing it computes is sent back).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deca_flower.core.schedule import build_schedule
from deca_flower.core.topology import neighbours
from deca_flower.flower.checkpoints import write_checkpoint
from deca_flower.flower.membership import Membership
from deca_flower.flower.transport import CoordinationError
from deca_flower.protocol import messages as pm
from deca_flower.protocol.packing import consensus_distance, record_bytes
from deca_flower.results import RunWriter, mean_std

log = logging.getLogger(__name__)


@dataclass
class Progress:
    step: int = 0
    bytes_sent: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per partition
    halves: dict[int, pm.StepResult] = field(default_factory=dict)  # the last step's, by partition id
    peak_opt_bytes: float = 0.0
    started: float = field(default_factory=time.time)


class Coordinator:
    """Run DECA's block visits over the nodes of `membership`.

    Parameters
    ----------
    membership : Membership
        The nodes taking part and the mixing weights W over them (set before `train`).
    writer : RunWriter
        Where metrics, samples and the checkpoint go.
    rounds : int
        T: passes over all blocks.
    block_order : str
        Order of the block visits in a round: "ascending", "descending" or "random" (seeded).
    seed : int
        Seed of a random block order.
    secure_gossip : bool
        Halves are sealed per neighbour: relay each node the copy sealed for it; no consensus
        distance (the relay cannot read them) and no rejoin (the donated blocks would pass in clear).
    compressed : bool
        Nodes send compressed payloads (changes of their public copies, core/choco.py), not halves:
        no consensus distance from what is relayed.
    headline : tuple[str, str]
        The held-out metrics each evaluation reports (mean, std and per node).
    """

    def __init__(self, membership: Membership, writer: RunWriter, *, rounds: int, block_order: str, seed: int,
                 secure_gossip: bool, compressed: bool, headline: tuple[str, str]) -> None:
        self.membership, self.writer = membership, writer
        self.rounds, self.block_order, self.seed = rounds, block_order, seed
        self.secure_gossip, self.headline, self.compressed = secure_gossip, headline, compressed
        self.progress = Progress(bytes_sent=np.zeros(membership.num_nodes))

    def train(self, num_blocks: int, steps_per_visit: int, evaluate_every: int, visits_done: int = 0) -> None:
        """Every block visit of the schedule after the first `visits_done`, evaluating after every
        `evaluate_every` visits and at the end."""
        progress = self.progress
        schedule = build_schedule(num_blocks, self.rounds, self.block_order, self.seed)
        total = len(schedule) * steps_per_visit
        unfinished: dict[str, Any] | None = None  # checkpoint of a visit whose finish rides on the next step
        saving: dict[str, Any] | None = None  # ... of a visit the nodes may still be saving in the background
        for visit in schedule[visits_done:]:
            losses: list[float] = []
            walls, computes, totals = [], [], []  # per inner step: wall time; slowest node's and all nodes'
            # forward + backward + Adam time (the critical path when nodes run side by side / one after another)
            for r in range(steps_per_visit):
                finish = unfinished["visit"] if unfinished and r == 0 else None
                tic = time.time()
                results = self.exchange(block=visit.block, start=(r == 0), finish=finish)
                walls.append(time.time() - tic)
                if saving:  # every node answered a message after the finish one: it waited for the save first
                    self._checkpoint({**saving, "dropped": self.membership.dropped, "rejoined": self.membership.rejoined})
                    saving = None
                if finish is not None:
                    saving, unfinished = unfinished, None
                computes.append(max(m.step_s for m in results.values()))
                totals.append(sum(m.step_s for m in results.values()))
                losses.append(float(np.mean([m.loss for m in results.values()])))
                progress.peak_opt_bytes = max([progress.peak_opt_bytes, *(m.opt_bytes for m in results.values())])
            distance = float("nan") if self.secure_gossip or self.compressed else consensus_distance(
                {pid: r.half for pid, r in progress.halves.items() if r.half is not None})
            self.writer.append({"kind": "visit", "round": visit.round, "block": visit.block, "step": progress.step,
                                "loss_mean": float(np.mean(losses)), "consensus_distance": distance,
                                "bytes_sent_per_node": float(progress.bytes_sent.mean()),
                                "step_wall_s": float(np.mean(walls)), "step_compute_s": float(np.mean(computes)),
                                "step_compute_sum_s": float(np.mean(totals)),
                                "elapsed_s": time.time() - progress.started})
            log.info("round %d/%d block %d (%d/%d visits): loss %.4f, consensus distance %.3g, step %d/%d, %.0fs",
                     visit.round + 1, self.rounds, visit.block, visit.position + 1, len(schedule), np.mean(losses),
                     distance, progress.step, total, time.time() - progress.started)
            last = visit.position + 1 == len(schedule)
            evaluate = last or (evaluate_every and (visit.position + 1) % evaluate_every == 0)
            if not (evaluate or self.membership.may_rejoin(self.secure_gossip)):
                # the last mix of the visit goes with the next visit's first step: nodes mix, save the
                # finished block, start the next one (one message round per visit fewer)
                unfinished = self.snapshot(visit.position)
                continue
            self.exchange(block=None, start=False, finish=visit.position)  # saved before the replies
            saving = None  # superseded by the checkpoint written below
            if evaluate:
                self.evaluate(sorted(self.membership.node_of), visit.round, visit.block, final=last)
            if not last and self.membership.may_rejoin(self.secure_gossip):
                visited = sorted({v.block for v in schedule[: visit.position + 1]})
                for donor, sent in self.membership.rejoin(visit.position, visited, progress.step).items():
                    progress.bytes_sent[donor] += sent
            self._checkpoint(self.snapshot(visit.position))
            if not last:
                self.membership.check_connected(visit.position)

    def exchange(self, *, block: int | None, start: bool, finish: int | None = None) -> dict[int, pm.StepResult]:
        """One inner step: relay each node its neighbours' previous halves; collect new halves.
        `finish`: after mixing, nodes finish their active block and save it as that visit;
        block None: no local step after that. Returns the results with step metrics, by partition."""
        progress, membership = self.progress, self.membership
        weights = membership.weights
        requests = {}
        for pid in membership.node_of:
            nbrs = neighbours(weights, pid)
            ask = pm.TrainStep(step=progress.step, block=block, start=start, finish=finish)
            if self.secure_gossip:  # relayed as received; each node checks the signatures itself
                ask.public_keys = {j: membership.public_keys[j][0] for j in nbrs}
                ask.signatures = {j: membership.public_keys[j][1] for j in nbrs}
            if progress.halves:
                ask.self_weight, ask.weights = float(weights[pid, pid]), nbrs
                ask.dropped = sorted(membership.dropped)  # each node checks W against the graph less these
                ask.halves = {j: progress.halves[j].sealed[pid] if self.secure_gossip else progress.halves[j].half
                              for j in nbrs}
            requests[pid] = ask
        results = {pid: pm.StepResult.from_content(reply.content)
                   for pid, reply in membership.ask(requests, progress.step).items()}
        for pid, result in results.items():
            if block is not None:
                self._check_sizes(pid, block, result, first=start)
            if result.half is not None:
                progress.bytes_sent[pid] += record_bytes(result.half) * len(neighbours(weights, pid))
            progress.bytes_sent[pid] += sum(record_bytes(r) for r in result.sealed.values())  # one per neighbour
            for reason in result.excluded:
                log.warning("step %d: node %d excluded %s", progress.step, pid, reason)
                self.writer.append({"kind": "excluded", "step": progress.step, "node": pid, "reason": reason})
        # replies come in any order: by partition id, so means and the consensus distance are summed
        # in the same order in every run (a resumed run ends bit for bit equal)
        progress.halves = {pid: r for pid, r in results.items() if r.half is not None or r.sealed}
        if block is not None:
            progress.step += 1
        return {pid: r for pid, r in results.items() if r.loss is not None}

    def _check_sizes(self, pid: int, block: int, result: pm.StepResult, *, first: bool) -> None:
        """Relay no half of another size than the block's (one model: every node's half of block b has
        the size they all reported at setup, for a visit's `first` step and for the later ones);
        refused before any neighbour receives it."""
        sizes_of = self.membership.first_half_bytes if first else self.membership.half_bytes
        expected = sizes_of[block] if block < len(sizes_of) else None
        sizes = ([record_bytes(result.half)] if result.half is not None else []) + [
            record_bytes(r) for r in result.sealed.values()]
        wrong = [size for size in sizes if size != expected]
        if wrong:
            raise CoordinationError(f"node {pid} sent a half of block {block} of {wrong[0]} bytes, expected {expected}: "
                                    "not relayed")

    def evaluate(self, partitions: list[int], round_: int, block: int, *, final: bool = False) -> dict[str, Any]:
        """Held-out metrics of each node (the final one also asks for generated samples); block -1:
        the untrained model."""
        replies = self.membership.ask({pid: pm.Evaluate(samples=final) for pid in partitions}, self.progress.step)
        if not replies:
            raise CoordinationError(f"no node answered the evaluation at step {self.progress.step}")
        per_node = {pid: pm.Evaluation.from_content(reply.content) for pid, reply in replies.items()}
        samples = {pid: list(zip(e.prompts, e.answers)) for pid, e in per_node.items() if e.prompts}
        if samples:
            self.writer.write_samples(samples)
        record: dict[str, Any] = {"kind": "eval", "round": round_, "block": block, "step": self.progress.step,
                                  "nodes": len(per_node), "bytes_sent_per_node": float(self.progress.bytes_sent.mean()),
                                  "elapsed_s": time.time() - self.progress.started}
        for key in self.headline:
            values = [per_node[p].metrics[key] for p in sorted(per_node)]
            record[f"{key}_mean"], record[f"{key}_std"] = mean_std(values)
            record[f"{key}_per_node"] = values
        self.writer.append(record)
        log.info("eval at step %d over %d node(s): %s", record["step"], record["nodes"],
                 ", ".join(f"{k} {record[k + '_mean']:.3f} +- {record[k + '_std']:.3f}" for k in self.headline))
        return record

    # -- block-boundary checkpoints ----------------------------------------------------------

    def snapshot(self, visit: int) -> dict[str, Any]:
        """Where the run stands at the end of `visit` (what `resume` needs)."""
        progress, membership = self.progress, self.membership
        return {"visit": visit, "step": progress.step, "bytes_sent": progress.bytes_sent.tolist(),
                "peak_opt_bytes": progress.peak_opt_bytes, "elapsed_s": time.time() - progress.started,
                "metrics_lines": self.writer.lines, "dropped": dict(membership.dropped),
                "rejoined": list(membership.rejoined)}

    def _checkpoint(self, state: dict[str, Any]) -> None:
        write_checkpoint(self.writer.run_dir, state)

    def resume(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: nodes that were taking part go back to their own checkpoint
        of that visit; nodes dropped by then stay out until they rejoin."""
        progress, membership = self.progress, self.membership
        progress.step, progress.peak_opt_bytes = int(state["step"]), float(state["peak_opt_bytes"])
        progress.bytes_sent = np.array(state["bytes_sent"], dtype=float)
        progress.started = time.time() - float(state["elapsed_s"])
        membership.dropped = {int(k): v for k, v in state["dropped"].items()}
        membership.rejoined = list(state["rejoined"])
        for pid in membership.dropped:
            membership.node_of.pop(pid, None)
        missing = sorted(set(range(membership.num_nodes)) - set(membership.node_of) - set(membership.dropped))
        if missing:
            raise CoordinationError(f"cannot resume without partition(s) {missing}: they were taking part at the "
                                    f"checkpoint (only nodes dropped by then, {sorted(membership.dropped)}, may be missing)")
        membership.ask({pid: pm.Resume(int(state["visit"])) for pid in membership.node_of}, progress.step, dropouts=False)
        if membership.dropped:
            membership.reweight()
