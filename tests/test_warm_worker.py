"""The warm per-node worker (deployment): same numbers as running the ClientApp in-process, and a
worker that dies is replaced by one that restores the node from disk."""

import os
import signal

import pytest

from apps.client_app import app as client_app
from deca_flower.flower import state
from deca_flower.flower.job import run_deca
from deca_flower.paths import prepare_run
from tests.inprocess import InProcessGrid


def worker_configs(tmp_path, num_nodes):
    return {pid: {"partition-id": pid, "num-partitions": num_nodes, "warm-worker": True,
                  "worker-socket": str(tmp_path / f"w{pid}.sock"), "warm-worker-idle-s": 120.0}
            for pid in range(num_nodes)}


def stop_workers(tmp_path):
    for pid_file in tmp_path.glob("w*.pid"):
        os.kill(int(pid_file.read_text()), signal.SIGTERM)


class KillingGrid(InProcessGrid):
    """Kills one node's worker process (SIGKILL) after a given number of train messages."""

    def __init__(self, *args, kill_worker_of: int, kill_at: int, sockets, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kill_worker_of, self.kill_at, self.sockets = kill_worker_of, kill_at, sockets

    def push_messages(self, messages):
        if self.total_trains >= self.kill_at and self.kill_at >= 0:
            pid = int((self.sockets / f"w{self.kill_worker_of}.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # the test process started it (via the ClientApp), so it reaps it
            self.kill_at = -1
        return super().push_messages(messages)


def run(cfg, grid):
    state._WARM.clear()
    cfg, run_dir = prepare_run(cfg)
    return run_deca(grid, cfg, run_dir)


@pytest.mark.deployment
def test_warm_workers_give_the_in_process_numbers_and_survive_a_kill(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(num_nodes=3, rounds=1, state_sync="step", eval_every_blocks=1)
    local = run(cfg.replace(run_name="local", state_dir=str(tmp_path / "local")), InProcessGrid(client_app, 3))
    try:
        through_workers = run(cfg.replace(run_name="workers", state_dir=str(tmp_path / "workers")),
                              InProcessGrid(client_app, 3, run_id=8, node_configs=worker_configs(tmp_path, 3)))
        assert not state._WARM  # nothing ran in this process: the workers held the nodes
        assert through_workers["final"] == local["final"]
        killed = KillingGrid(client_app, 3, run_id=9, node_configs=worker_configs(tmp_path, 3),
                             kill_worker_of=1, kill_at=4, sockets=tmp_path)  # mid-visit: restored from disk
        after_kill = run(cfg.replace(run_name="killed", state_dir=str(tmp_path / "killed")), killed)
        assert killed.kill_at == -1 and after_kill["final"] == local["final"]
        assert "restored from" in (tmp_path / "w1.log").read_text()
    finally:
        stop_workers(tmp_path)


def test_worker_is_used_in_flowers_per_message_process_unless_turned_off(monkeypatch):
    from flwr.app import Context, RecordDict

    from deca_flower.flower import worker

    def context(node_config):
        return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})

    monkeypatch.setattr(worker.sys, "argv", ["/venv/bin/flwr-clientapp", "--token", "x"])
    assert worker.wanted(context({"partition-id": 0}))
    assert not worker.wanted(context({"partition-id": 0, "warm-worker": False}))
    monkeypatch.setattr(worker.sys, "argv", ["python"])  # a simulation actor, or a test
    assert not worker.wanted(context({"partition-id": 0}))
    assert worker.wanted(context({"partition-id": 0, "warm-worker": True}))
    monkeypatch.setenv(worker.IN_WORKER, "1")  # inside the worker: run the handlers
    assert not worker.wanted(context({"partition-id": 0, "warm-worker": True}))
    monkeypatch.delenv(worker.IN_WORKER)
    monkeypatch.setattr(worker, "_runs_here", False)
    worker.run_here()  # deca-flower-supernode's task runner: warm itself ...
    assert not worker.wanted(context({"partition-id": 0, "warm-worker": True}))
    assert worker.IN_WORKER not in os.environ  # ... while the processes it starts for another app forward


def _context(node_config):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_a_socket_folder_others_can_open_is_refused(tmp_path, monkeypatch):
    import tempfile

    from deca_flower.flower import worker

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = tmp_path / f"deca-flower-{os.getuid()}"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    with pytest.raises(worker.WorkerError, match="only this user can open"):
        worker.socket_path(_context({"partition-id": 0}))
    folder.chmod(0o700)
    assert worker.socket_path(_context({"partition-id": 0})).parent == folder


def test_a_worker_that_cannot_start_is_reported_at_once(tmp_path, monkeypatch):
    import time

    from deca_flower.flower import worker

    with pytest.raises(worker.WorkerError, match="warm-worker-idle-s must be a positive"):
        worker.forward(None, _context({"warm-worker-idle-s": -1.0}), tmp_path / "w.sock")
    monkeypatch.setattr(worker.sys, "executable", "/bin/false")  # exits 1 at once
    started = time.monotonic()
    with pytest.raises(worker.WorkerError, match="exited with code 1 while starting"):
        worker._start(tmp_path / "w.sock", 60.0)
    assert time.monotonic() - started < 10  # not START_TIMEOUT_S


def test_a_broken_connection_does_not_end_the_worker(tmp_path):
    import socket
    import threading
    import time

    from deca_flower.flower import worker

    path = tmp_path / "w.sock"
    server = threading.Thread(target=worker.serve, args=(path, 3.0), daemon=True)
    server.start()
    while not path.with_suffix(".pid").exists():  # written once it listens
        time.sleep(0.01)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(path))
    conn.sendall(worker._HEADER.pack(100) + b"only part of it")  # then the sender dies
    conn.close()
    time.sleep(0.5)
    assert server.is_alive() and path.exists()  # still serving; it leaves after idle_s
    server.join(timeout=10)
    assert not server.is_alive() and not path.exists()
