"""A real deployment on loopback: flower-superlink + 3 flower-supernode processes + `flwr run`.

Every message runs in a fresh `flwr-clientapp` process there, which hands it to the node's warm
worker (started on demand); the result must equal the in-process run of the same config and seed.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.loopback import ROOT, Loopback
from tests.test_flower_matches_reference import flower_run


@pytest.mark.deployment
def test_loopback_deployment_equals_in_process_run(tiny_cfg, tmp_path):
    federation = Loopback(tmp_path)
    federation.start_superlink()
    for pid in range(3):
        federation.start_supernode(f"supernode{pid}", f"partition-id={pid} num-partitions=3 "
                                   f"worker-socket='{tmp_path / f'w{pid}.sock'}' warm-worker-idle-s=60")
    cfg = tiny_cfg.replace(state_sync="step", run_name="deployed", results_dir=str(tmp_path / "runs"),
                           state_dir=str(tmp_path / "deployed-nodes"))
    overrides = (f"model='tiny-random' num-nodes=3 topology='ring' steps-per-block=2 batch-size=2 max-text-tokens=16 "
                 f"eval-samples=20 eval-batch-size=10 lr=0.001 eval-every-blocks=0 state-sync='step' run-name='deployed' "
                 f"results-dir='{cfg.results_dir}' state-dir='{cfg.state_dir}'")
    try:
        run = federation.flwr("run", str(ROOT), "loopback", "--stream", "--run-config", overrides)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        for pid_file in tmp_path.glob("w*.pid"):  # the warm workers
            os.kill(int(pid_file.read_text()), 15)
        federation.stop()
    assert all("listening" in (tmp_path / f"w{pid}.log").read_text() for pid in range(3))  # warm workers served
    deployed = json.loads((tmp_path / "runs" / "deployed" / "summary.json").read_text())
    summary, _, in_process = flower_run(cfg.replace(state_dir=str(tmp_path / "in-process-nodes"), run_name="local"))
    assert deployed["final"]["accuracy_per_node"] == pytest.approx(summary["final"]["accuracy_per_node"])
    for pid, runtime in enumerate(in_process):  # every block each deployed node saved equals the in-process one
        params = dict(runtime.node.model.named_parameters())
        files = sorted((tmp_path / "deployed-nodes" / f"node_{pid:03d}").glob("block_*.safetensors"))
        assert len(files) == len(runtime.blocks)
        for file in files:
            for name, value in load_file(file).items():
                torch.testing.assert_close(value, params[name].detach(), rtol=1e-5, atol=1e-6)
