"""The centralised reference: Flower's own FedAvg strategy (the server DOES average here).

Each round every node loads the global model, runs R local steps of full-parameter Adam (fresh
moments, like a DECA visit) on its own partition and sends the whole model back; FedAvg averages
weighted by "num-examples". T * B rounds of R steps = the same local steps as DECA.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from deca_flower.config import DecaConfig
from deca_flower.flower import records as rk
from deca_flower.flower.client import runtime_for
from deca_flower.flower.coordinator import Coordinator
from deca_flower.results import RunWriter

log = logging.getLogger(__name__)
ARRAYS = "arrays"
ROUND_KEY = "server-round"


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
    from deca_flower.models import load_model

    writer = RunWriter(run_dir)
    writer.write_config(cfg.to_run_config())
    coordinator = Coordinator(grid, cfg, writer)
    started = time.time()
    infos = coordinator.query_nodes(coordinator.wait_for_nodes())
    deca_blocks = int(infos[0]["steps-per-visit"]) // cfg.steps_per_block
    num_rounds = cfg.rounds * deca_blocks
    model, _ = load_model(cfg.model, torch.device("cpu"), seed=cfg.seed)  # same init as every node
    initial = ArrayRecord(parameters(model))
    model_bytes = rk.record_bytes(initial)
    del model
    initial_eval = coordinator.evaluate([0], 0, -1) if cfg.eval_initial else None
    every = cfg.eval_every_blocks or deca_blocks
    strategy = EvaluateOnSchedule(
        eval_rounds={r for r in range(1, num_rounds + 1) if r % every == 0 or r == num_rounds},
        min_train_nodes=cfg.num_nodes, min_available_nodes=cfg.num_nodes, min_evaluate_nodes=1,
        configrecord_key=rk.CONFIG, arrayrecord_key=ARRAYS,
    )
    log.info("FedAvg: %d rounds x %d local full-Adam steps on %d nodes; model %.0f MiB each way per round",
             num_rounds, cfg.steps_per_block, cfg.num_nodes, model_bytes / 2**20)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=num_rounds, timeout=cfg.reply_timeout_s,
                            train_config=ConfigRecord(cfg.to_run_config()),
                            evaluate_config=ConfigRecord(cfg.to_run_config()))
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
        "label_counts": {pid: infos[pid]["label-counts"] for pid in sorted(infos)},
    }
    writer.write_summary(summary)
    writer.plot_headline(cfg.headline, f"FedAvg on {cfg.dataset}, {cfg.num_nodes} nodes")
    log.info("FedAvg done in %.0fs: %s %.3f", summary["wall_time_s"], cfg.headline[0], final[f"{cfg.headline[0]}_mean"])
    return summary


# -- ClientApp side -------------------------------------------------------------------------

def _config_only(msg: Message) -> Message:
    """FedAvg adds 'server-round' to the config record; the node config has no such key."""
    config = ConfigRecord({k: v for k, v in msg.content[rk.CONFIG].items() if k != ROUND_KEY})
    return Message(metadata=msg.metadata, content=RecordDict({rk.CONFIG: config}))


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What FedAvg sends: every parameter once (a tied LM head is the embedding, not a second copy).
    In fp32: ArrayRecord has no bfloat16, the dtype of a GPU node's weights (a no-op on CPU's fp32)."""
    return {name: p.detach().float() for name, p in model.named_parameters()}


def _load_global(runtime, msg: Message) -> None:
    received = msg.content[ARRAYS].to_torch_state_dict()
    params = dict(runtime.node.model.named_parameters())
    if received.keys() != params.keys():
        raise ValueError(f"global model has parameters {sorted(set(received) ^ set(params))[:3]} that do not match")
    with torch.no_grad():
        for name, value in received.items():
            params[name].copy_(value)


def handle_fedavg_train(msg: Message, context: Context) -> Message:
    runtime = runtime_for(_config_only(msg), context)
    _load_global(runtime, msg)
    node = runtime.node
    node.start_block(0)
    losses = [node.local_step()[0] for _ in range(runtime.cfg.steps_per_block)]
    node.end_block()
    metrics = MetricRecord({"num-examples": len(runtime.train), "loss": float(np.mean(losses)),
                            "opt-bytes": float(node.peak_optimizer_bytes)})
    return Message(RecordDict({ARRAYS: ArrayRecord(parameters(node.model)), "metrics": metrics}), reply_to=msg)


def handle_fedavg_evaluate(msg: Message, context: Context) -> Message:
    runtime = runtime_for(_config_only(msg), context)
    _load_global(runtime, msg)
    metrics = runtime.evaluate()
    metrics["num-examples"] = metrics.pop("num_examples")
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
