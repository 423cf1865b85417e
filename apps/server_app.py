"""ServerApp: resolve the run config, then relay blocks between graph neighbours (never average);
method fedavg runs Flower's FedAvg strategy instead, as the centralised reference. No torch here:
the ServerApp handles blocks as records only."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from deca_flower.config import DecaConfig
from deca_flower.flower.fedavg import run_fedavg
from deca_flower.flower.job import run_deca
from deca_flower.logs import use_flower_logging
from deca_flower.paths import prepare_run

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    use_flower_logging()
    cfg, run_dir = prepare_run(DecaConfig.from_run_config(context.run_config))
    (run_fedavg if cfg.method == "fedavg" else run_deca)(grid, cfg, run_dir)
