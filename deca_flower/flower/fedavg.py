"""The centralised reference (ServerApp side): Flower's own FedAvg strategy (the server DOES average here).

Each round every node loads the global model, runs R local steps of full-parameter Adam (fresh
moments, like a DECA visit) on its own partition and sends the whole model back
(flower/fedavg_client.py); FedAvg averages weighted by "num-examples". T * B rounds of R steps =
the same local steps as DECA. The initial model comes from a node (every node loads the same
seeded initialisation), so the ServerApp never loads torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from deca_flower.config import DecaConfig
from deca_flower.flower import internals
from deca_flower.flower.job import connect, coordinator_for
from deca_flower.protocol import messages as pm
from deca_flower.protocol.packing import record_bytes
from deca_flower.results import RunWriter, check_run_folder

log = logging.getLogger(__name__)


class EvaluateOnSchedule(FedAvg):
    """Flower's FedAvg, with client evaluation only on chosen rounds and on one node (all nodes
    hold the same global model, so one score is the score of every node)."""

    def __init__(self, eval_rounds: set[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.eval_rounds = eval_rounds

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if server_round not in self.eval_rounds:
            return []
        return list(super().configure_evaluate(server_round, arrays, config, grid))[:1]


def run_fedavg(grid: Grid, cfg: DecaConfig, run_dir: Path) -> dict[str, Any]:
    check_run_folder(run_dir, resume=False, overwrite=cfg.overwrite)  # before any node connects
    writer = RunWriter(run_dir)
    membership = connect(grid, cfg, writer)
    coordinator = coordinator_for(membership, cfg)
    started = time.time()
    infos = membership.set_up(membership.wait_for_nodes())
    writer.write_config(cfg.to_run_config())
    deca_blocks = infos[0].steps_per_visit // cfg.steps_per_block
    num_rounds = cfg.rounds * deca_blocks
    relayed = pm.ModelArrays.from_content(membership.ask({0: pm.InitialModel()}, 0)[0].content).arrays
    initial = ArrayRecord({name: Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=bytes(a.data))
                           for name, a in relayed.items()})  # its own bytes, not the SuperLink's by id
    model_bytes = record_bytes(initial)
    initial_eval = coordinator.evaluate([0], 0, -1) if cfg.eval_initial else None
    internals.stop_holding_confirmations(grid)  # Flower's strategy pulls (and confirms) on its own from here
    every = cfg.eval_every_blocks or deca_blocks
    strategy = EvaluateOnSchedule(
        eval_rounds={r for r in range(1, num_rounds + 1) if r % every == 0 or r == num_rounds},
        min_train_nodes=cfg.num_nodes, min_available_nodes=cfg.num_nodes, min_evaluate_nodes=1,
        arrayrecord_key=pm.FEDAVG_ARRAYS,
    )
    log.info("FedAvg: %d rounds x %d local full-Adam steps on %d nodes; model %.0f MiB each way per round",
             num_rounds, cfg.steps_per_block, cfg.num_nodes, model_bytes / 2**20)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=num_rounds, timeout=cfg.reply_timeout_s)
    for rnd, metrics in sorted(result.evaluate_metrics_clientapp.items()):
        record = {"kind": "eval", "round": rnd, "block": -1, "step": rnd * cfg.steps_per_block, "nodes": cfg.num_nodes,
                  "bytes_sent_per_node": float(rnd * 2 * model_bytes), "elapsed_s": time.time() - started}
        for key in cfg.headline:  # one global model: every node has the same score
            record[f"{key}_mean"], record[f"{key}_std"] = float(metrics[key]), 0.0
            record[f"{key}_per_node"] = [float(metrics[key])] * cfg.num_nodes
        writer.append(record)
    losses = [float(m["loss"]) for _, m in sorted(result.train_metrics_clientapp.items())]
    peak = max(float(m["opt-bytes"]) for m in result.train_metrics_clientapp.values())
    final = writer.evaluations[-1]
    summary = {
        "method": "fedavg", "model": cfg.model, "dataset": cfg.dataset, "num_nodes": cfg.num_nodes,
        "topology": "star (server averages)", "num_blocks": 1, "inner_steps": num_rounds * cfg.steps_per_block,
        "task": cfg.task, "headline": list(cfg.headline),
        "final": {k: final[k] for k in final if k.startswith(cfg.headline)},
        "initial": None if initial_eval is None else {k: initial_eval[f"{k}_mean"] for k in cfg.headline},
        "bytes_sent_per_node": float(num_rounds * 2 * model_bytes), "peak_optimizer_bytes_per_node": peak,
        "train_loss_per_round": losses, "wall_time_s": time.time() - started,
        "label_counts": {pid: infos[pid].label_counts for pid in sorted(infos)},
    }
    writer.write_summary(summary)
    writer.plot_headline(cfg.headline, f"FedAvg on {cfg.dataset}, {cfg.num_nodes} nodes")
    log.info("FedAvg done in %.0fs: %s %.3f", summary["wall_time_s"], cfg.headline[0], final[f"{cfg.headline[0]}_mean"])
    return summary
