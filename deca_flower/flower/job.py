"""One DECA job on the ServerApp side: set up the nodes (fresh or from a checkpoint), build the
graph and W over their partition ids, train over the block schedule, write summary and plots."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from deca_flower.config import DecaConfig
from deca_flower.core.topology import build_graph, metropolis_hastings, spectral_gap
from deca_flower.data.splits import partitioner_for
from deca_flower.flower.checkpoints import checkpoint_to_resume
from deca_flower.flower.coordinator import Coordinator
from deca_flower.flower.membership import Membership
from deca_flower.flower.transport import Transport
from deca_flower.results import RunWriter, check_run_folder, plot_label_distribution

log = logging.getLogger(__name__)


def connect(grid: Grid, cfg: DecaConfig, writer: RunWriter) -> Membership:
    """The run's nodes, before any of them is asked anything."""
    return Membership(Transport(grid, cfg.reply_timeout_s), writer, cfg.to_run_config(), cfg.num_nodes,
                      node_wait_s=cfg.node_wait_s, on_disconnect=cfg.on_disconnect, rejoin_probe_s=cfg.rejoin_probe_s,
                      disconnect_wait_s=0.0 if cfg.secure_gossip else cfg.disconnect_wait_s)  # (no rejoin there)


def coordinator_for(membership: Membership, cfg: DecaConfig) -> Coordinator:
    return Coordinator(membership, membership.writer, rounds=cfg.rounds, block_order=cfg.block_order, seed=cfg.seed,
                       secure_gossip=cfg.secure_gossip, headline=cfg.headline, compressed=cfg.compression != "none")


def run_deca(grid: Grid, cfg: DecaConfig, run_dir: Path) -> dict[str, Any]:
    """The whole job; returns the summary that is also written to run_dir/summary.json.
    The run folder is checked before any node connects and changed only once the nodes are set up."""
    check_run_folder(run_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    checkpoint = checkpoint_to_resume(cfg, run_dir) if cfg.resume else None
    writer = RunWriter(run_dir, keep_lines=checkpoint["metrics_lines"] if checkpoint else None)
    membership = connect(grid, cfg, writer)
    coordinator = coordinator_for(membership, cfg)
    started = time.time()
    # a resumed run can go on without the nodes it had dropped (they may rejoin later)
    needed = cfg.num_nodes - len(checkpoint["dropped"]) if checkpoint else cfg.num_nodes
    log.info("waiting for %d nodes", needed)
    infos = membership.set_up(membership.wait_for_nodes(needed), fresh=checkpoint is None)
    writer.write_config(cfg.to_run_config())
    membership.graph = build_graph(cfg.topology, cfg.num_nodes, seed=cfg.seed, edge_prob=cfg.edge_prob)
    membership.weights = metropolis_hastings(membership.graph)
    gap = spectral_gap(membership.weights)
    if checkpoint:
        coordinator.resume(checkpoint)
        log.info("resuming %s after visit %d (step %d)", run_dir, checkpoint["visit"], checkpoint["step"])
    first = infos[min(infos)]  # the same on every node: one model, one config
    log.info("%d nodes ready in %.0fs; %s graph with %d edges, spectral gap %.3f; %d blocks x %d steps x %d rounds",
             len(infos), time.time() - started, cfg.topology, membership.graph.number_of_edges(), gap, first.num_blocks,
             first.steps_per_visit, cfg.rounds)
    if not any(info.own_data for info in infos.values()):  # sites' own files are not the server's to plot
        plot_label_distribution(partitioner_for(cfg), run_dir, f"{cfg.partitioner} split over {cfg.num_nodes} nodes")
    if checkpoint:
        initial = next((e for e in writer.evaluations if e["block"] == -1), None)
    else:
        initial = coordinator.evaluate([0], 0, -1) if cfg.eval_initial else None
        coordinator.progress.started = time.time()  # elapsed_s in metrics counts training, not node setup
    coordinator.train(first.num_blocks, first.steps_per_visit, cfg.eval_every_blocks or first.num_blocks,
                      visits_done=checkpoint["visit"] + 1 if checkpoint else 0)
    final = writer.evaluations[-1]
    progress = coordinator.progress
    summary = {
        "method": cfg.method, "model": cfg.model, "dataset": cfg.dataset, "num_nodes": cfg.num_nodes,
        "topology": cfg.topology, "edges": sorted(map(list, membership.graph.edges())), "spectral_gap": gap,
        "num_blocks": first.num_blocks, "inner_steps": progress.step,
        "task": cfg.task, "headline": list(cfg.headline),
        "final": {k: final[k] for k in final if k.startswith(cfg.headline)},
        "initial": None if initial is None else {k: initial[f"{k}_mean"] for k in cfg.headline},
        "bytes_sent_per_node": float(progress.bytes_sent.mean()),
        "peak_optimizer_bytes_per_node": progress.peak_opt_bytes,
        "wall_time_s": time.time() - started,
        "label_counts": {pid: infos[pid].label_counts for pid in sorted(infos)},
        "dropped_nodes": membership.dropped,
        "rejoined_nodes": membership.rejoined,
    }
    writer.write_summary(summary)
    writer.plot_headline(cfg.headline, f"DECA ({cfg.effective_bma} BMA) on {cfg.dataset}, {cfg.num_nodes} nodes, "
                         f"{cfg.topology}")
    key = cfg.headline[0]
    log.info("done in %.0fs: %s %.3f +- %.3f (untrained %.3f); results in %s", summary["wall_time_s"], key,
             final[f"{key}_mean"], final[f"{key}_std"], summary["initial"][key] if initial else float("nan"), run_dir)
    return summary
