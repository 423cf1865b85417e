"""The simulation engine (`flwr run` on a SuperLink in simulation mode: Ray actors, messages
pickled between processes) equals the in-process run of the same config and seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deca_flower.flower.loopback import Loopback
from tests.test_deployment import as_run_config, assert_saved_blocks_equal
from tests.test_flower_matches_reference import flower_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.deployment
def test_simulation_engine_equals_in_process_run(tiny_cfg, tmp_path):
    federation = Loopback(tmp_path, simulation=True)
    federation.start_superlink()
    cfg = tiny_cfg.replace(run_name="simulated", state_dir=str(tmp_path / "simulated-nodes"))
    try:
        run = federation.flwr("run", str(ROOT), "loopback", "--stream", "--run-config", as_run_config(cfg),
                              "--federation-config", f"num-supernodes={cfg.num_nodes}")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        federation.stop()
    simulated = [json.loads(line) for line in (tmp_path / "runs" / "simulated" / "metrics.jsonl").read_text().splitlines()]
    summary, run_dir, in_process = flower_run(cfg.replace(state_dir=str(tmp_path / "in-process-nodes"), run_name="local"))
    local = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    visits = [[value for r in records if r["kind"] == "visit" for value in (r["loss_mean"], r["consensus_distance"])]
              for records in (simulated, local)]
    assert len(visits[0]) == len(visits[1]) > 0
    assert visits[0] == pytest.approx(visits[1], rel=1e-5)
    final = json.loads((tmp_path / "runs" / "simulated" / "summary.json").read_text())["final"]
    assert final["accuracy_per_node"] == pytest.approx(summary["final"]["accuracy_per_node"])
    assert_saved_blocks_equal(tmp_path / "simulated-nodes", in_process)
