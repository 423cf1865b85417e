"""ClientApp side of the centralised reference (method fedavg): the node's share of Flower's FedAvg.

Each round the node loads the global model, runs R local steps of full-parameter Adam (fresh
moments, like a DECA visit) on its own partition and sends the whole model back."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from deca_flower.flower.handlers import runtime_of
from deca_flower.protocol import messages as pm
from deca_flower.runtime import NodeRuntime


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What FedAvg sends: every parameter once (a tied LM head is the embedding, not a second copy).
    In fp32: ArrayRecord has no bfloat16, the dtype of a GPU node's weights (a no-op on CPU's fp32)."""
    return {name: p.detach().float() for name, p in model.named_parameters()}


def handle_initial_model(msg: Message, context: Context) -> Message:
    pm.InitialModel.from_content(msg.content)
    return pm.reply(msg, pm.ModelArrays(ArrayRecord(parameters(runtime_of(msg, context).node.model))))


def _load_global(runtime: NodeRuntime, msg: Message) -> None:
    received = msg.content[pm.FEDAVG_ARRAYS].to_torch_state_dict()
    params = dict(runtime.node.model.named_parameters())
    if received.keys() != params.keys():
        raise ValueError(f"global model has parameters {sorted(set(received) ^ set(params))[:3]} that do not match")
    with torch.no_grad():
        for name, value in received.items():
            params[name].copy_(value)


def handle_fedavg_train(msg: Message, context: Context) -> Message:
    runtime = runtime_of(msg, context)
    _load_global(runtime, msg)
    node = runtime.node
    node.start_block(0)
    losses = [node.local_step()[0] for _ in range(runtime.cfg.steps_per_block)]
    node.end_block()
    metrics = MetricRecord({"num-examples": len(runtime.train), "loss": float(np.mean(losses)),
                            "opt-bytes": float(node.peak_optimizer_bytes)})
    return Message(RecordDict({pm.FEDAVG_ARRAYS: ArrayRecord(parameters(node.model)), "metrics": metrics}), reply_to=msg)


def handle_fedavg_evaluate(msg: Message, context: Context) -> Message:
    runtime = runtime_of(msg, context)
    _load_global(runtime, msg)
    metrics = runtime.evaluate()
    metrics["num-examples"] = metrics.pop("num_examples")
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
