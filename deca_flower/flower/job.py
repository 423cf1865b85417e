"""One DECA job on the ServerApp side: set up the coordinator (fresh or from a checkpoint), train
over the block schedule, and write the run's summary and plots."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid
from omegaconf import OmegaConf

from deca_flower.config import DecaConfig
from deca_flower.core.topology import build_graph, metropolis_hastings, spectral_gap
from deca_flower.flower.coordinator import CHECKPOINT, CoordinationError, Coordinator
from deca_flower.results import RunWriter

log = logging.getLogger(__name__)

RESUMABLE_CHANGES = {"resume", "node-wait-s", "reply-timeout-s", "rejoin-probe-s"}  # may differ on resume


def run_deca(grid: Grid, cfg: DecaConfig, run_dir: Path) -> dict[str, Any]:
    """The whole job; returns the summary that is also written to run_dir/summary.json."""
    from deca_flower.results import plot_label_distribution
    from deca_flower.runtime import partitioner_for

    checkpoint = _checkpoint_to_resume(cfg, run_dir) if cfg.resume else None
    writer = RunWriter(run_dir, keep_lines=checkpoint["metrics_lines"] if checkpoint else None)
    writer.write_config(cfg.to_run_config())
    coordinator = Coordinator(grid, cfg, writer)
    started = time.time()
    # a resumed run can go on without the nodes it had dropped (they may rejoin later)
    needed = cfg.num_nodes - len(checkpoint["dropped"]) if checkpoint else cfg.num_nodes
    log.info("waiting for %d nodes", needed)
    infos = coordinator.query_nodes(coordinator.wait_for_nodes(needed), fresh=checkpoint is None)
    graph = build_graph(cfg.topology, cfg.num_nodes, seed=cfg.seed, edge_prob=cfg.edge_prob)
    weights = metropolis_hastings(graph)
    coordinator.graph = graph
    gap = spectral_gap(weights)
    if checkpoint:
        coordinator.resume(checkpoint)
        weights = coordinator.weights if coordinator.dropped else weights
        log.info("resuming %s after visit %d (step %d)", run_dir, checkpoint["visit"], checkpoint["step"])
    first = infos[min(infos)]  # the same on every node: one model, one config
    num_blocks, steps_per_visit = int(first["num-blocks"]), int(first["steps-per-visit"])
    log.info("%d nodes ready in %.0fs; %s graph with %d edges, spectral gap %.3f; %d blocks x %d steps x %d rounds",
             len(infos), time.time() - started, cfg.topology, graph.number_of_edges(), gap, num_blocks,
             steps_per_visit, cfg.rounds)
    if not any(info["own-data"] for info in infos.values()):  # sites' own files are not the server's to plot
        plot_label_distribution(partitioner_for(cfg), run_dir, f"{cfg.partitioner} split over {cfg.num_nodes} nodes")
    if checkpoint:
        initial = next((e for e in writer.evaluations if e["block"] == -1), None)
    else:
        initial = coordinator.evaluate([0], 0, -1) if cfg.eval_initial else None
        coordinator.progress.started = time.time()  # elapsed_s in metrics counts training, not node setup
    coordinator.train(weights, num_blocks, steps_per_visit, cfg.eval_every_blocks or num_blocks,
                      visits_done=checkpoint["visit"] + 1 if checkpoint else 0)
    final = writer.evaluations[-1]
    summary = {
        "method": cfg.method, "model": cfg.model, "dataset": cfg.dataset, "num_nodes": cfg.num_nodes,
        "topology": cfg.topology, "edges": sorted(map(list, graph.edges())), "spectral_gap": gap,
        "num_blocks": num_blocks, "inner_steps": coordinator.progress.step,
        "task": cfg.task, "headline": list(cfg.headline),
        "final": {k: final[k] for k in final if k.startswith(cfg.headline)},
        "initial": None if initial is None else {k: initial[f"{k}_mean"] for k in cfg.headline},
        "bytes_sent_per_node": float(coordinator.progress.bytes_sent.mean()),
        "peak_optimizer_bytes_per_node": coordinator.progress.peak_opt_bytes,
        "wall_time_s": time.time() - started,
        "label_counts": {pid: infos[pid]["label-counts"] for pid in sorted(infos)},
        "dropped_nodes": coordinator.dropped,
        "rejoined_nodes": coordinator.rejoined,
    }
    writer.write_summary(summary)
    writer.plot_headline(cfg.headline, f"DECA ({cfg.effective_bma} BMA) on {cfg.dataset}, {cfg.num_nodes} nodes, "
                         f"{cfg.topology}")
    key = cfg.headline[0]
    log.info("done in %.0fs: %s %.3f +- %.3f (untrained %.3f); results in %s", summary["wall_time_s"], key,
             final[f"{key}_mean"], final[f"{key}_std"], summary["initial"][key] if initial else float("nan"), run_dir)
    return summary


def _checkpoint_to_resume(cfg: DecaConfig, run_dir: Path) -> dict[str, Any] | None:
    """The coordinator checkpoint of the run to continue (None: it had not finished a visit)."""
    file = run_dir / CHECKPOINT
    if not (run_dir / "config.yaml").is_file():
        others = sorted(p.parent.name for p in run_dir.parent.glob(f"*/{CHECKPOINT}"))
        raise CoordinationError(f"resume=true but there is no run in {run_dir} (run folders with a checkpoint "
                                f"under {run_dir.parent}: {others or 'none'})")
    if not file.is_file():
        log.warning("resume=true: %s finished no block visit before it stopped; starting it again", run_dir)
        return None
    state = json.loads(file.read_text())
    saved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    changed = {k: (saved.get(k), v) for k, v in cfg.to_run_config().items()
               if k not in RESUMABLE_CHANGES and saved.get(k) != v}
    if changed:
        raise CoordinationError(f"resume=true with a config that differs from the run's saved config: {changed}")
    return state
