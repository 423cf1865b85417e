"""Where a run writes: <results-dir>/<run-name>/ (node state under nodes/ unless state-dir is set).

A relative results-dir resolves against $DECA_FLOWER_HOME, else the current directory, because
`flwr run` executes the ServerApp from an installed copy of the app, not from the project.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from deca_flower.config import DecaConfig


def prepare_run(cfg: DecaConfig) -> tuple[DecaConfig, Path]:
    base = Path(cfg.results_dir).expanduser()
    if not base.is_absolute():
        base = Path(os.environ.get("DECA_FLOWER_HOME", Path.cwd())) / base
    name = cfg.run_name or f"{cfg.method}-{cfg.topology}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = base / name
    state_dir = cfg.state_dir or str(run_dir / "nodes")
    return cfg.replace(run_name=name, results_dir=str(base), state_dir=state_dir), run_dir
