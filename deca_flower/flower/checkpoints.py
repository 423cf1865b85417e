"""ServerApp side: the coordinator's block-boundary checkpoint (run_dir/checkpoint.json), written
once every node has saved the visit it names, and read back by `resume=true`. The nodes keep
their own checkpoints (flower/state.py); this one says which visit they all have."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from deca_flower.config import DecaConfig
from deca_flower.flower.transport import CoordinationError

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.json"
RESUMABLE_CHANGES = {"resume", "node-wait-s", "reply-timeout-s", "rejoin-probe-s"}  # may differ on resume


def write_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Every node has finished and saved state["visit"]: record it (atomic)."""
    tmp = run_dir / f"{CHECKPOINT}.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(run_dir / CHECKPOINT)


def checkpoint_to_resume(cfg: DecaConfig, run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint of the run to continue (None: it had not finished a visit); refused if the run
    is not there or its saved config differs from `cfg` beyond RESUMABLE_CHANGES."""
    file = run_dir / CHECKPOINT
    if not (run_dir / "config.yaml").is_file():
        others = sorted(p.parent.name for p in run_dir.parent.glob(f"*/{CHECKPOINT}"))
        raise CoordinationError(f"resume=true but there is no run in {run_dir} (run folders with a checkpoint "
                                f"under {run_dir.parent}: {others or 'none'})")
    if not file.is_file():
        log.warning("resume=true: %s finished no block visit before it stopped; starting it again", run_dir)
        return None
    saved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    changed = {k: (saved.get(k), v) for k, v in cfg.to_run_config().items()
               if k not in RESUMABLE_CHANGES and saved.get(k) != v}
    if changed:
        raise CoordinationError(f"resume=true with a config that differs from the run's saved config: {changed}")
    return json.loads(file.read_text())
