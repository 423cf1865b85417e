"""ClientApp: one handler per DECA message (deca_flower/protocol/messages.py); the gossip mod
mixes neighbours' blocks (+BMA) before a train step. Method fedavg answers Flower's FedAvg."""

from __future__ import annotations

from flwr.clientapp import ClientApp

from deca_flower.flower import fedavg_client, handlers
from deca_flower.logs import use_flower_logging
from deca_flower.protocol import messages as pm

use_flower_logging()

app = ClientApp(mods=[handlers.gossip_mod])


def _action(payload: type[pm.Payload]) -> str:
    return payload.MESSAGE_TYPE.split(".", 1)[1]


app.query(_action(pm.Setup))(handlers.handle_setup)
app.query(_action(pm.RejoinProbe))(handlers.handle_rejoin_probe)
app.query(_action(pm.Resume))(handlers.handle_resume)
app.query(_action(pm.Donate))(handlers.handle_donate)
app.query(_action(pm.Handover))(handlers.handle_handover)
app.query(_action(pm.InitialModel))(fedavg_client.handle_initial_model)
app.train(_action(pm.TrainStep))(handlers.handle_step)
app.evaluate(_action(pm.Evaluate))(handlers.handle_evaluate)
app.train()(fedavg_client.handle_fedavg_train)  # Flower's FedAvg sends plain "train" and "evaluate" messages
app.evaluate()(fedavg_client.handle_fedavg_evaluate)
