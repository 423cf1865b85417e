"""ClientApp: the gossip mod mixes neighbours' blocks (+BMA); handlers step, evaluate, answer queries."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from deca_flower.flower.client import gossip_mod, handle_evaluate, handle_query, handle_train
from deca_flower.flower.fedavg import handle_fedavg_evaluate, handle_fedavg_train
from deca_flower.logs import use_flower_logging

use_flower_logging()
app = ClientApp(mods=[gossip_mod])


@app.query("deca")
def query(msg: Message, context: Context) -> Message:
    return handle_query(msg, context)


@app.train("deca")
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)


@app.evaluate("deca")
def evaluate(msg: Message, context: Context) -> Message:
    return handle_evaluate(msg, context)


@app.train()
def fedavg_train(msg: Message, context: Context) -> Message:
    """Flower's FedAvg sends plain "train" messages (method fedavg)."""
    return handle_fedavg_train(msg, context)


@app.evaluate()
def fedavg_evaluate(msg: Message, context: Context) -> Message:
    return handle_fedavg_evaluate(msg, context)
