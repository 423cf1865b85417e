"""A local federation of real Flower processes on 127.0.0.1 (tests and benchmarks): one
flower-superlink, SuperNodes, and the flwr CLI, each process logging to its own file.

Flower serves Fleet, Control and ServerAppIo on one HTTP port per SuperLink. With `tls` (a folder
holding ca.crt, server.pem, server.key) everything runs over HTTPS; with `supernode_auth` the
SuperLink only admits SuperNodes whose public key was registered. The SuperLink keeps its state in
memory (Flower's default) unless given a `database` file, where it writes every message's blocks
to SQLite (slow for large blocks). With `simulation` the SuperLink runs the simulation engine (no
SuperNodes to start). SuperNodes run `supernode_program` (+ `supernode_args`):
`deca-flower-supernode` (capped polls, the ClientApp warm in the SuperNode) or Flower's own
`flower-supernode` (a `flwr-clientapp` process per message).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent  # the environment's console scripts: flwr, flower-superlink, ...


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Loopback:
    """Start with start_superlink() and start_supernode(), run apps with flwr(), end with stop().

    Parameters
    ----------
    tmp_path : Path
        A folder of its own: logs/, and flwr/ as FLWR_HOME (its config.toml names this SuperLink "loopback").
    tls, supernode_auth, supernode_program, supernode_args, database, simulation
        As described in the module docstring.
    """

    def __init__(self, tmp_path: Path, *, tls: Path | None = None, supernode_auth: bool = False,
                 supernode_program: str = "deca-flower-supernode", supernode_args: tuple[str, ...] = (),
                 database: Path | None = None, simulation: bool = False) -> None:
        self.tmp_path, self.tls, self.supernode_auth, self.simulation = tmp_path, tls, supernode_auth, simulation
        self.supernode_program, self.supernode_args, self.database = supernode_program, supernode_args, database
        self.link = free_ports(1)[0]
        self.logs = tmp_path / "logs"
        self.logs.mkdir(exist_ok=True)
        home = tmp_path / "flwr"
        home.mkdir(exist_ok=True)
        security = f'root-certificates = "{tls / "ca.crt"}"' if tls else "insecure = true"
        (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                          f'address = "127.0.0.1:{self.link}"\n{security}\n')
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    # a SuperNode's SuperExec looks for messages to start a ClientApp for every 1 s by default
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25"}
        self.procs: list[subprocess.Popen] = []

    def _security(self, *, server: bool) -> list[str]:
        if not self.tls:
            return ["--insecure"]
        if server:
            return ["--ssl-ca-certfile", str(self.tls / "ca.crt"), "--ssl-certfile", str(self.tls / "server.pem"),
                    "--ssl-keyfile", str(self.tls / "server.key")]
        return ["--root-certificates", str(self.tls / "ca.crt")]

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(argv, env=self.env, stdout=(self.logs / f"{name}.log").open("w"),
                                stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start_superlink(self) -> None:
        proc = self._start("superlink", [
            BIN / "flower-superlink", *self._security(server=True), "--isolation", "subprocess", "--host", "127.0.0.1",
            "--port", str(self.link), *(["--database", str(self.database)] if self.database else []),
            *(["--enable-supernode-auth"] if self.supernode_auth else []),
            *(["--simulation"] if self.simulation else [])])
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"superlink exited with {proc.returncode}: {self.log('superlink')[-2000:]}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.link)) == 0:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"superlink not listening after 120s: {self.log('superlink')[-2000:]}")

    def start_supernode(self, name: str, node_config: str, private_key: Path | None = None) -> subprocess.Popen:
        return self._start(name, [
            BIN / self.supernode_program, *self.supernode_args, *self._security(server=False),
            "--superlink", f"127.0.0.1:{self.link}",
            "--node-config", node_config, "--host", "127.0.0.1", "--port", str(free_ports(1)[0]),
            *(["--auth-supernode-private-key", str(private_key)] if private_key else [])])

    def flwr(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([BIN / "flwr", *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()

    def stop(self) -> None:
        for proc in self.procs[::-1]:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
