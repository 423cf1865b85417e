"""The single-process reference job: same config, same nodes, same math as the Flower run.

    deca-flower reference --fast --run-config "seed=1 bma='none'"

It writes the same run folder as `flwr run` (config.yaml, metrics.jsonl with a line per visit and
per evaluation, summary.json), so that experiments can sweep with it (`engine: reference-fast`).
Evaluations follow eval-every-blocks as in the Flower run; the untrained model is scored once, on
node 0, since every node starts from the same weights.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from deca_flower.config import DecaConfig
from deca_flower.core.node import DecaNode
from deca_flower.core.reference import consensus_distance, run_reference
from deca_flower.core.schedule import Visit, build_schedule
from deca_flower.core.topology import build_graph, metropolis_hastings, neighbours, spectral_gap
from deca_flower.protocol.tensors import payload_wire_bytes, wire_bytes
from deca_flower.results import RunWriter, mean_std
from deca_flower.runtime import NodeRuntime, build_runtime

log = logging.getLogger(__name__)


def build_nodes(cfg: DecaConfig) -> list[NodeRuntime]:
    return [build_runtime(cfg, pid) for pid in range(cfg.num_nodes)]


def evaluation(cfg: DecaConfig, per_node: list[dict[str, float]], visit: Visit | None, step: int,
               bytes_sent: float, started: float) -> dict[str, Any]:
    """One metrics.jsonl "eval" line, in the Flower run's format."""
    record: dict[str, Any] = {"kind": "eval", "round": visit.round if visit else 0, "block": visit.block if visit else -1,
                              "step": step, "nodes": len(per_node), "bytes_sent_per_node": bytes_sent,
                              "elapsed_s": time.time() - started}
    for key in cfg.headline:
        values = [m[key] for m in per_node]
        record[f"{key}_mean"], record[f"{key}_std"] = mean_std(values)
        record[f"{key}_per_node"] = values
    return record


def sent_bytes(node: DecaNode) -> int:
    """Bytes of the record a node sent each neighbour at the step just taken, as the relay counts
    them: its packed half-step block, or its packed compressed payload (a visit's first is int8)."""
    if node.public is None:
        return wire_bytes(node.block_values())
    return payload_wire_bytes(node.public.settings.codec_at(node.public.sent - 1), node.public.shapes)


def run_reference_job(cfg: DecaConfig, *, fast: bool = False, runtimes: list[NodeRuntime] | None = None,
                      run_dir: Path | None = None) -> dict[str, Any]:
    """Train every node in this process; return (and with run_dir, write) the run's summary."""
    started = time.time()
    runtimes = runtimes or build_nodes(cfg)
    writer = RunWriter(run_dir) if run_dir else None
    if writer:
        writer.write_config(cfg.to_run_config())
    graph = build_graph(cfg.topology, cfg.num_nodes, seed=cfg.seed, edge_prob=cfg.edge_prob)
    weights = metropolis_hastings(graph)
    num_blocks, steps = len(runtimes[0].blocks), runtimes[0].steps_per_visit
    schedule = build_schedule(num_blocks, cfg.rounds, cfg.block_order, cfg.seed)
    evaluate_every = cfg.eval_every_blocks or num_blocks
    degrees = [len(neighbours(weights, i)) for i in range(cfg.num_nodes)]
    nodes = [r.node for r in runtimes]
    progress: dict[str, Any] = {"step": 0, "bytes": 0.0, "losses": [], "eval_s": 0.0}
    evaluations: list[dict[str, Any]] = []

    def record(line: dict[str, Any]) -> None:
        if line["kind"] == "eval":
            evaluations.append(line)
        if writer:
            writer.append(line)

    def on_step(visit: Visit, step: int, node_losses: list[float]) -> None:
        progress["step"] += 1
        progress["losses"].append(sum(node_losses) / len(node_losses))
        progress["bytes"] += sum(sent_bytes(node) * d for node, d in zip(nodes, degrees)) / len(nodes)

    def after_visit(visit: Visit, last_halves: list[dict[str, torch.Tensor]] | None) -> None:
        visit_losses = progress["losses"][-steps:]
        distance = float("nan") if last_halves is None else consensus_distance(last_halves)
        record({"kind": "visit", "round": visit.round, "block": visit.block, "step": progress["step"],
                "loss_mean": sum(visit_losses) / len(visit_losses), "consensus_distance": distance,
                "bytes_sent_per_node": progress["bytes"], "elapsed_s": time.time() - started})
        log.info("visit %d/%d block %d: loss %.4f, consensus distance %.3g, %.0fs", visit.position + 1, len(schedule),
                 visit.block, sum(visit_losses) / len(visit_losses), distance, time.time() - started)
        if (visit.position + 1) % evaluate_every == 0 or visit.position + 1 == len(schedule):
            tic = time.time()
            line = evaluation(cfg, [r.evaluate() for r in runtimes], visit, progress["step"], progress["bytes"], started)
            progress["eval_s"] += time.time() - tic
            record(line)
            log.info("eval at step %d: %s", line["step"], ", ".join(f"{k} {line[k + '_mean']:.3f}" for k in cfg.headline))

    initial = None
    if cfg.eval_initial:  # every node holds the same untrained weights: one evaluation stands for all
        initial = evaluation(cfg, [runtimes[0].evaluate()] * len(runtimes), None, 0, 0.0, started)
        record(initial)
    tic = time.time()
    run_reference(nodes, weights, schedule, steps, fast=fast, on_step=on_step, after_visit=after_visit)
    train_s = time.time() - tic - progress["eval_s"]
    final = evaluations[-1]
    last_visit = progress["losses"][-steps:]
    summary = {
        "engine": "reference-fast" if fast else "reference",
        "method": cfg.method, "model": cfg.model, "dataset": cfg.dataset, "num_nodes": cfg.num_nodes,
        "topology": cfg.topology, "edges": sorted(map(list, graph.edges())), "spectral_gap": spectral_gap(weights),
        "num_blocks": num_blocks, "inner_steps": progress["step"], "task": cfg.task, "headline": list(cfg.headline),
        "final": {k: final[k] for k in final if k.startswith(cfg.headline)},
        "initial": None if initial is None else {k: initial[f"{k}_mean"] for k in cfg.headline},
        "final_loss": sum(last_visit) / len(last_visit),
        "final_consensus_distance": consensus_distance([{k: p.detach() for k, p in n.model.named_parameters()}
                                                        for n in nodes]),
        "bytes_sent_per_node": progress["bytes"],
        "peak_optimizer_bytes_per_node": max(n.peak_optimizer_bytes for n in nodes),
        "wall_time_s": time.time() - started, "train_s": train_s,
        "label_counts": {r.partition_id: r.label_counts for r in runtimes},
    }
    if writer:
        writer.write_summary(summary)
        writer.plot_headline(cfg.headline, f"DECA ({cfg.effective_bma} BMA, reference) on {cfg.dataset}, "
                             f"{cfg.num_nodes} nodes, {cfg.topology}")
    return summary
