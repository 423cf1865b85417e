"""A real deployment on loopback: flower-superlink + SuperNode processes + `flwr run`.

Both ways to run a node must equal the in-process run of the same config and seed, block for block:
- `deca-flower-supernode`: the node's ClientApp runs warm in a thread of the SuperNode process, on
  the node's own state and object store;
- Flower's stock `flower-supernode`: every message runs in a fresh `flwr-clientapp` process, which
  rebuilds the node from its state on disk (written after every message in such a process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deca_flower.compare import run_config_string
from deca_flower.flower.loopback import BIN, Loopback
from tests.test_flower_matches_reference import flower_run

ROOT = Path(__file__).resolve().parent.parent


def as_run_config(cfg) -> str:
    """`cfg` as `flwr run --run-config` overrides, with the waits of a real federation (the numbers
    do not depend on them; the fixture's are for in-process grids, which answer during the push)."""
    return run_config_string(cfg.replace(reply_timeout_s=600.0, node_wait_s=120.0, rejoin_probe_s=20.0).to_run_config())


def assert_saved_blocks_equal(state_dir: Path, in_process: list) -> None:
    """Every block each deployed node saved equals the in-process node's."""
    for pid, runtime in enumerate(in_process):
        params = dict(runtime.node.model.named_parameters())
        files = sorted((state_dir / f"node_{pid:03d}").glob("block_*.safetensors"))
        assert len(files) == len(runtime.blocks)
        for file in files:
            for name, value in load_file(file).items():
                torch.testing.assert_close(value, params[name].detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.deployment
@pytest.mark.parametrize(("supernode_program", "job"), [
    ("deca-flower-supernode", {}),  # the irregular 4-node graph
    # a process per message imports torch and rebuilds the node from disk: a shorter job on 2 nodes
    ("flower-supernode", {"num_nodes": 2, "topology": "complete", "steps_per_block": 1, "eval_initial": False}),
], ids=["deca-flower-supernode", "flower-supernode"])
def test_loopback_deployment_equals_in_process_run(tiny_cfg, tmp_path, supernode_program, job):
    cfg = tiny_cfg.replace(**job, run_name="deployed", state_dir=str(tmp_path / "deployed-nodes"))
    federation = Loopback(tmp_path, supernode_program=supernode_program)
    federation.start_superlink()
    for pid in range(cfg.num_nodes):
        federation.start_supernode(f"supernode{pid}", f"partition-id={pid} num-partitions={cfg.num_nodes}")
    try:
        run = federation.flwr("run", str(ROOT), "loopback", "--stream", "--run-config", as_run_config(cfg))
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        federation.stop()
    per_message = [federation.log(f"supernode{pid}").count("Start `flwr-clientapp` process")
                   for pid in range(cfg.num_nodes)]
    if supernode_program == "deca-flower-supernode":  # the SuperNode ran every message itself
        assert per_message == [0] * cfg.num_nodes
    else:  # a flwr-clientapp process per message, each restoring the node from disk
        assert min(per_message) >= 5 and "restored from" in federation.log("supernode0")
    deployed = json.loads((tmp_path / "runs" / "deployed" / "summary.json").read_text())
    summary, _, in_process = flower_run(cfg.replace(state_dir=str(tmp_path / "in-process-nodes"), run_name="local"))
    assert deployed["final"]["accuracy_per_node"] == pytest.approx(summary["final"]["accuracy_per_node"])
    assert_saved_blocks_equal(tmp_path / "deployed-nodes", in_process)


@pytest.mark.deployment
def test_a_killed_supernode_started_again_rejoins(tiny_cfg, tmp_path):
    """With the tasks in the SuperNode process, a crash takes the node's warm state with it: SIGKILL
    node 2's SuperNode mid-run and start it again with the same node config (as compose's restart
    policy would). The SuperLink answers its open message with "node unavailable" once its heartbeat
    lapses, the coordinator drops the node and goes on, and the new SuperNode rejoins with a
    neighbour's blocks at a block boundary; all four nodes finish."""
    federation = Loopback(tmp_path)
    federation.start_superlink()
    supernodes = [federation.start_supernode(f"supernode{pid}", f"partition-id={pid} num-partitions=4")
                  for pid in range(4)]
    cfg = tiny_cfg.replace(steps_per_block=3, rounds=3, eval_initial=False, state_sync="step", run_name="crash")
    runs = Path(cfg.results_dir)
    run = subprocess.Popen([BIN / "flwr", "run", str(ROOT), "loopback", "--stream", "--run-config", as_run_config(cfg)],
                           env=federation.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = runs / "crash" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (metrics.exists() and '"kind": "visit"' in metrics.read_text()):
            assert run.poll() is None and time.monotonic() < deadline, "the run ended or stalled before the kill"
            time.sleep(0.2)
        os.kill(supernodes[2].pid, signal.SIGKILL)
        supernodes[2].wait()
        federation.start_supernode("supernode2-again", "partition-id=2 num-partitions=4")
        output, _ = run.communicate(timeout=600)
        # `flwr run --stream` exits 0 even when the ServerApp fails: the summary says it finished
        assert run.returncode == 0 and (runs / "crash" / "summary.json").exists(), output[-5000:]
    finally:
        run.kill()
        federation.stop()
    summary = json.loads((runs / "crash" / "summary.json").read_text())
    assert summary["dropped_nodes"] == {} and len(summary["final"]["accuracy_per_node"]) == 4
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    (dropout,) = [r for r in records if r["kind"] == "dropout"]
    (rejoin,) = [r for r in records if r["kind"] == "rejoin"]
    assert dropout["node"] == rejoin["node"] == 2 and rejoin["step"] >= dropout["step"] and rejoin["from"] in (1, 3)
    assert "Receiving: train.step message" in federation.log("supernode2-again")  # it took part in training again


@pytest.mark.deployment
def test_a_site_policy_in_a_supernodes_node_config_refuses_a_run_that_asks_for_less(tiny_cfg, tmp_path):
    """A site sets what it requires in its own SuperNode's --node-config; a run config asking for
    less (no secure-gossip) is refused by that node, naming the reason, and nothing trains."""
    federation = Loopback(tmp_path)
    federation.start_superlink()
    federation.start_supernode("supernode0", "partition-id=0 num-partitions=2")
    federation.start_supernode("supernode1", "partition-id=1 num-partitions=2 require-secure-gossip=true")
    cfg = tiny_cfg.replace(num_nodes=2, topology="complete", run_name="refused")
    try:
        run = federation.flwr("run", str(ROOT), "loopback", "--stream", "--run-config", as_run_config(cfg))
    finally:
        federation.stop()
    output = run.stdout + run.stderr
    assert "node 1 refuses this run: the site requires secure-gossip=true" in output, output[-5000:]
    assert not (Path(cfg.results_dir) / "refused" / "summary.json").exists()
    assert "Receiving: train.step message" not in federation.log("supernode1")
