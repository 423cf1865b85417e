"""A real deployment on loopback: flower-superlink + 3 SuperNode processes + `flwr run`.

Every way a node stays warm must equal the in-process run of the same config and seed:
- `deca-flower-supernode`: the node's ClientApp runs in a thread of the SuperNode process, on the
  node's own state and object store;
- `deca-flower-supernode --task-runner in-process`: it runs in the SuperNode's SuperExec process,
  the task runner, which the SuperNode restarts if it dies;
- Flower's `flower-supernode`: every message runs in a fresh `flwr-clientapp` process, which hands
  it to the node's warm worker (started on demand).
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

from tests.loopback import BIN, ROOT, Loopback
from tests.test_flower_matches_reference import flower_run


@pytest.mark.deployment
@pytest.mark.parametrize("supernode_program, supernode_args", [
    ("deca-flower-supernode", ()), ("deca-flower-supernode", ("--task-runner", "in-process")), ("flower-supernode", ())])
def test_loopback_deployment_equals_in_process_run(tiny_cfg, tmp_path, supernode_program, supernode_args):
    federation = Loopback(tmp_path, supernode_program=supernode_program, supernode_args=supernode_args)
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
    per_message = [federation.log(f"supernode{pid}").count("Start `flwr-clientapp` process") for pid in range(3)]
    runner_processes = [federation.log(f"supernode{pid}").count("Starting Flower SuperExec") for pid in range(3)]
    if supernode_program == "deca-flower-supernode":  # the SuperNode or its task runner ran every message itself
        assert per_message == [0, 0, 0] and not list(tmp_path.glob("w*.log"))
        assert runner_processes == ([1, 1, 1] if supernode_args else [0, 0, 0])
    else:  # a flwr-clientapp process per message, served by the warm workers
        assert min(per_message) > 5
        assert all("listening" in (tmp_path / f"w{pid}.log").read_text() for pid in range(3))
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


def _task_runner_of(supernode_pid: int) -> int:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if parent == supernode_pid and b"deca_flower.flower.task_runner" in cmdline:
            return int(stat.parent.name)
    raise AssertionError(f"no task runner under SuperNode process {supernode_pid}")


HOLD_HOOK = Path(__file__).parent / "hold_task_output"  # its sitecustomize.py holds a runner's task


def _run_and_kill_a_task_runner(tmp_path: Path, *, rounds: int, hold_at_task: int = 0,
                                supernode: bool = False) -> tuple[list[dict], str]:
    """A tiny job on 3 SuperNodes; SIGKILL node 2's task runner after the first visit, or (hold_at_task)
    while it holds that task between its reply and its "task done", or (supernode) node 2's whole
    SuperNode, whose tasks run in it, and start it again. The ServerApp must finish with all three
    nodes; returns the metrics records and node 2's (last) SuperNode log."""
    federation = Loopback(tmp_path, supernode_args=() if supernode else ("--task-runner", "in-process"))
    federation.start_superlink()
    supernodes = [federation.start_supernode(f"supernode{pid}", f"partition-id={pid} num-partitions=3")
                  for pid in range(2)]
    held = tmp_path / "held"
    plain_env = federation.env
    if hold_at_task:
        federation.env = {**plain_env, "PYTHONPATH": os.pathsep.join(filter(None, [str(HOLD_HOOK), plain_env.get("PYTHONPATH")])),
                          "DECA_TEST_HOLD_MARKER": str(held), "DECA_TEST_HOLD_AT_TASK": str(hold_at_task)}
    supernodes.append(federation.start_supernode("supernode2", "partition-id=2 num-partitions=3"))
    federation.env = plain_env
    runs = tmp_path / "runs"
    overrides = (f"model='tiny-random' num-nodes=3 topology='ring' steps-per-block=3 rounds={rounds} batch-size=2 "
                 f"max-text-tokens=16 eval-samples=20 eval-batch-size=10 eval-every-blocks=0 eval-initial=false "
                 f"state-sync='step' rejoin-probe-s=20 run-name='crash' results-dir='{runs}' "
                 f"state-dir='{tmp_path / 'nodes'}'")
    run = subprocess.Popen([BIN / "flwr", "run", str(ROOT), "loopback", "--stream", "--run-config", overrides],
                           env=federation.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = runs / "crash" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (held.exists() if hold_at_task else metrics.exists() and '"kind": "visit"' in metrics.read_text()):
            assert run.poll() is None and time.monotonic() < deadline, "the run ended or stalled before the kill"
            time.sleep(0.2)
        time.sleep(0.5 if hold_at_task else 0)  # the marker is written before the runner holds
        if supernode:
            os.kill(supernodes[2].pid, signal.SIGKILL)
            supernodes[2].wait()
            federation.start_supernode("supernode2-again", "partition-id=2 num-partitions=3")  # as compose restarts it
        else:
            os.kill(int(held.read_text()) if hold_at_task else _task_runner_of(supernodes[2].pid), signal.SIGKILL)
        output, _ = run.communicate(timeout=600)
        # `flwr run --stream` exits 0 even when the ServerApp fails: the summary says it finished
        assert run.returncode == 0 and (runs / "crash" / "summary.json").exists(), output[-5000:]
    finally:
        run.kill()
        federation.stop()
    log = federation.log("supernode2-again" if supernode else "supernode2")
    if not supernode:
        assert "the task runner exited with -9: starting a new one" in log
    summary = json.loads((runs / "crash" / "summary.json").read_text())
    assert summary["dropped_nodes"] == {} and len(summary["final"]["accuracy_per_node"]) == 3
    return [json.loads(line) for line in metrics.read_text().splitlines()], log


def _dropped_and_rejoined(records: list[dict]) -> None:
    (dropout,) = [r for r in records if r["kind"] == "dropout"]
    assert dropout["node"] == 2 and "stopped responding" in dropout["reason"]
    (rejoin,) = [r for r in records if r["kind"] == "rejoin"]
    assert rejoin["node"] == 2 and rejoin["step"] >= dropout["step"]


@pytest.mark.deployment
def test_a_killed_task_runner_is_dropped_restarted_and_rejoins(tmp_path):
    """SIGKILL one node's task runner mid-run; the SuperNode starts a new one. If the runner was in
    the middle of a message, Flower answers it with "ClientApp stopped responding" once the task's
    heartbeat expires (~1 min): the coordinator drops the node, goes on, and the node rejoins at
    the next block boundary. If it was between messages, the new runner restores the node from
    disk (state-sync='step') and it misses nothing. Either way all three nodes finish."""
    records, log = _run_and_kill_a_task_runner(tmp_path, rounds=2)
    if any(r["kind"] == "dropout" for r in records):
        _dropped_and_rejoined(records)
    else:
        assert "node 2 restored from" in log


@pytest.mark.deployment
def test_a_runner_killed_between_its_reply_and_task_done_rejoins(tmp_path):
    """The narrowest window: the runner's reply has left, its task is not reported done. The new
    runner takes the disk state one message ahead of its context. When the dead task's heartbeat
    expires (the hook keeps a message open until then), Flower answers the node's open message with
    "ClientApp stopped responding"; the new runner's own reply to it must be dropped
    (flower/supernode.py), or the SuperNode's one-in-one-out loop stays a reply behind and the
    node never rejoins."""
    records, log = _run_and_kill_a_task_runner(tmp_path, rounds=3, hold_at_task=5)
    assert "restored from" in log and "at generation 4 (its context: 3)" in log
    _dropped_and_rejoined(records)
    assert "dropping a second reply to message" in log


@pytest.mark.deployment
def test_a_killed_supernode_started_again_rejoins(tmp_path):
    """With the tasks in the SuperNode process (the default), a crash takes the whole SuperNode:
    SIGKILL node 2's mid-run and start it again with the same node config. The SuperLink answers
    its open message with "node unavailable" once its heartbeat lapses, the coordinator drops the
    node and goes on, and the new SuperNode rejoins with a neighbour's blocks at a block boundary."""
    records, log = _run_and_kill_a_task_runner(tmp_path, rounds=3, supernode=True)
    (dropout,) = [r for r in records if r["kind"] == "dropout"]
    (rejoin,) = [r for r in records if r["kind"] == "rejoin"]
    assert dropout["node"] == rejoin["node"] == 2 and rejoin["step"] >= dropout["step"]
    assert "Receiving: train.deca message" in log  # the new SuperNode took part in training
