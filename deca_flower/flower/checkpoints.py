"""ServerApp side: the coordinator's block-boundary checkpoint (run_dir/checkpoint.json), written
once every node has saved the visit it names, and read back by `resume=true`. The nodes keep
their own checkpoints (flower/state.py); this one says which visit they all have."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from deca_flower.config import DecaConfig
from deca_flower.flower.transport import CoordinationError
from deca_flower.results import CHECKPOINT

RESUMABLE_CHANGES = {"resume", "overwrite", "node-wait-s", "reply-timeout-s", "rejoin-probe-s",
                     "disconnect-wait-s"}  # may differ on resume


def write_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Every node has finished and saved state["visit"]: record it (atomic)."""
    tmp = run_dir / f"{CHECKPOINT}.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(run_dir / CHECKPOINT)


def checkpoint_to_resume(cfg: DecaConfig, run_dir: Path) -> dict[str, Any]:
    """The checkpoint of the run to continue (results.check_run_folder has made sure there is one);
    refused if the run's saved config is missing or differs from `cfg` beyond RESUMABLE_CHANGES."""
    if not (run_dir / "config.yaml").is_file():
        raise CoordinationError(f"resume=true but {run_dir} holds no config.yaml to compare the run config with")
    saved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    changed = {k: (saved.get(k), v) for k, v in cfg.to_run_config().items()
               if k not in RESUMABLE_CHANGES and saved.get(k) != v}
    if changed:
        raise CoordinationError(f"resume=true with a config that differs from the run's saved config: {changed}")
    return json.loads((run_dir / CHECKPOINT).read_text())
