"""A real deployment on loopback: flower-superlink + 3 flower-supernode processes + `flwr run`.

Every message runs in a fresh `flwr-clientapp` process there, so nodes restore their state from
disk (state-sync='step'); the result must equal the in-process run of the same config and seed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_flower_matches_reference import flower_run

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s: {log.read_text()[-2000:]}")


@pytest.mark.deployment
def test_loopback_deployment_equals_in_process_run(tiny_cfg, tmp_path):
    link, *node_ports = free_ports(4)  # Flower 1.41 serves Fleet, Control and ServerAppIo on one HTTP port
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = [subprocess.Popen(
        [BIN / "flower-superlink", "--insecure", "--isolation", "subprocess", "--host", "127.0.0.1",
         "--port", str(link), "--database", str(tmp_path / "link.db")],
        env=env, stdout=(logs / "superlink.log").open("w"), stderr=subprocess.STDOUT)]
    wait_for_port(link, procs[0], logs / "superlink.log")
    for pid, port in enumerate(node_ports):
        procs.append(subprocess.Popen(
            [BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--node-config",
             f"partition-id={pid} num-partitions=3", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=(logs / f"supernode{pid}.log").open("w"), stderr=subprocess.STDOUT))
    cfg = tiny_cfg.replace(state_sync="step", run_name="deployed", results_dir=str(tmp_path / "runs"),
                           state_dir=str(tmp_path / "deployed-nodes"))
    overrides = (f"model='tiny-random' num-nodes=3 topology='ring' steps-per-block=2 batch-size=2 max-text-tokens=16 "
                 f"eval-samples=20 eval-batch-size=10 lr=0.001 eval-every-blocks=0 state-sync='step' run-name='deployed' "
                 f"results-dir='{cfg.results_dir}' state-dir='{cfg.state_dir}'")
    try:
        run = subprocess.run([BIN / "flwr", "run", str(ROOT), "loopback", "--stream", "--run-config", overrides],
                             env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        for proc in procs[::-1]:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
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
