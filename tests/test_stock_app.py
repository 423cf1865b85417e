"""deca-flower-supernode is still a Flower SuperNode: a stock Flower app (a NumPy ClientApp and a
ServerApp running Flower's FedAvg, written here, nothing of deca_flower in it) runs on it unchanged."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from deca_flower.flower.loopback import Loopback

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "numpy-app"
version = "1.0.0"
dependencies = ["flwr[simulation]>=1.41", "numpy"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "tests"

[tool.flwr.app.components]
serverapp = "numpy_app:server"
clientapp = "numpy_app:client"

[tool.flwr.app.config]
rounds = 2
out = ""
"""

APP = '''\
"""FedAvg over one NumPy array: node k adds 1 + k to what it receives."""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

client = ClientApp()
server = ServerApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    step = 1 + int(context.node_config["partition-id"])
    arrays = [a + step for a in msg.content["arrays"].to_numpy_ndarrays()]
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 1})}),
                   reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord([np.zeros(3)]),
                            num_rounds=int(context.run_config["rounds"]))
    np.save(str(context.run_config["out"]), result.arrays.to_numpy_ndarrays()[0])
'''


@pytest.mark.deployment
def test_a_stock_numpy_flower_app_runs_unchanged_on_deca_flower_supernode(tmp_path):
    app = tmp_path / "numpy-app"
    app.mkdir()
    (app / "pyproject.toml").write_text(PYPROJECT)
    (app / "numpy_app.py").write_text(textwrap.dedent(APP))
    federation = Loopback(tmp_path)  # deca-flower-supernode
    out = tmp_path / "final.npy"
    try:
        federation.start_superlink()
        for pid in range(2):
            federation.start_supernode(f"supernode{pid}", f"partition-id={pid} num-partitions=2")
        run = federation.flwr("run", str(app), "loopback", "--stream", "--run-config", f"out='{out}'")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        federation.stop()
    # each round: the mean of x + 1 and x + 2 -> x + 1.5; two rounds from zeros
    np.testing.assert_array_equal(np.load(out), np.full(3, 3.0))
