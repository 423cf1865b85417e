"""ClientApp: the gossip mod mixes neighbours' blocks (+BMA); handlers step, evaluate, answer queries.

Under Flower's own flower-supernode every message gets a fresh process, so the first mod hands
the message to the node's warm worker (deca_flower/flower/worker.py) and this module imports
torch only when a handler actually runs here (simulation, the worker, or the warm task runner
that deca-flower-supernode uses instead of a process per message).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from deca_flower.flower.worker import warm_worker_mod
from deca_flower.logs import use_flower_logging

use_flower_logging()


def gossip(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    from deca_flower.flower.client import gossip_mod

    return gossip_mod(msg, context, call_next)


app = ClientApp(mods=[warm_worker_mod, gossip])


@app.query("deca")
def query(msg: Message, context: Context) -> Message:
    from deca_flower.flower.client import handle_query

    return handle_query(msg, context)


@app.train("deca")
def train(msg: Message, context: Context) -> Message:
    from deca_flower.flower.client import handle_train

    return handle_train(msg, context)


@app.evaluate("deca")
def evaluate(msg: Message, context: Context) -> Message:
    from deca_flower.flower.client import handle_evaluate

    return handle_evaluate(msg, context)


@app.train()
def fedavg_train(msg: Message, context: Context) -> Message:
    """Flower's FedAvg sends plain "train" messages (method fedavg)."""
    from deca_flower.flower.fedavg import handle_fedavg_train

    return handle_fedavg_train(msg, context)


@app.evaluate()
def fedavg_evaluate(msg: Message, context: Context) -> Message:
    from deca_flower.flower.fedavg import handle_fedavg_evaluate

    return handle_fedavg_evaluate(msg, context)
