"""A long-lived process per SuperNode that keeps the node warm across messages (deployment).

Flower's deployment engine starts a fresh `flwr-clientapp` process for every message; loading
torch and the model there for every inner step would dominate the run. So the ClientApp's first
mod forwards (message, context) over a Unix socket to this worker, which runs the very same
ClientApp in-process, as a simulation actor does, and returns the reply and the updated context.
(`deca-flower-supernode` has no per-message process: its task runner, flower/task_runner.py,
runs the ClientApp itself; this worker serves Flower's plain `flower-supernode`.)

- started on demand by the first message, one per partition id and app version;
- a worker that died (or a request it could not finish) is replaced by a new one, which has
  nothing warm and so restores the node from its on-disk state (flower/state.py);
- it exits after `warm-worker-idle-s` without messages;
- only protobuf bytes cross the socket (no pickle), in a directory only this user can open.

This module is imported by every per-message process, so it does not import torch.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import logging
import math
import os
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ContextProto
from flwr.proto.message_pb2 import Message as MessageProto

log = logging.getLogger(__name__)

IN_WORKER = "DECA_FLOWER_IN_WORKER"  # set in the worker's environment: its ClientApp runs the handlers itself
START_TIMEOUT_S = 300.0
_HEADER = struct.Struct("!Q")
_runs_here = False  # see run_here


class WorkerError(RuntimeError):
    """The warm worker could not be started or reached."""


def run_here() -> None:
    """This process keeps the node warm itself (deca-flower-supernode's task runner): never forward.
    A flag in this process, not its environment, which the per-message processes it starts for
    another app version inherit: they should forward to a warm worker."""
    global _runs_here
    _runs_here = True


def wanted(context: Context) -> bool:
    """node-config warm-worker=true/false; unset: on in Flower's per-message flwr-clientapp process."""
    if _runs_here or os.environ.get(IN_WORKER):
        return False
    setting = context.node_config.get("warm-worker")
    if setting is None:
        return Path(sys.argv[0]).name == "flwr-clientapp"
    return str(setting).lower() in ("true", "1", "yes")


def warm_worker_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """First mod: hand the message to this node's warm worker (when wanted) instead of running here."""
    if not wanted(context):
        return call_next(msg, context)
    return forward(msg, context, socket_path(context))


def socket_path(context: Context) -> Path:
    """One worker per partition id and loaded app version (a new FAB gets a new worker)."""
    if "worker-socket" in context.node_config:
        return Path(str(context.node_config["worker-socket"]))
    import apps

    version = hashlib.sha256(str(Path(apps.__file__).resolve()).encode()).hexdigest()[:10]
    folder = Path(tempfile.gettempdir()) / f"deca-flower-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    found = folder.lstat()  # one another user made could hand this node's messages to their own listener
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise WorkerError(f"{folder} must be a directory that only this user can open (mode 700); remove it")
    return folder / f"p{context.node_config.get('partition-id', 'x')}-{version}.sock"


def forward(msg: Message, context: Context, path: Path) -> Message:
    """Run the message in the worker; start (or restart) the worker if needed, retrying once."""
    idle_s = float(context.node_config.get("warm-worker-idle-s", 900.0))
    if not 0 < idle_s < math.inf:
        raise WorkerError(f"node-config warm-worker-idle-s must be a positive number of seconds, got {idle_s}")
    request = [message_to_proto(msg).SerializeToString(), context_to_proto(context).SerializeToString()]
    for attempt in (1, 2):
        try:
            with _connect(path) if path.exists() else _start(path, idle_s) as conn:
                _send(conn, request)
                reply, new_context = _receive(conn, 2)
            break
        except (ConnectionError, FileNotFoundError, EOFError) as err:
            if attempt == 2:
                raise WorkerError(f"warm worker at {path} failed twice: {err}") from err
            log.warning("warm worker at %s is gone (%s): starting a new one", path, err)
            path.unlink(missing_ok=True)
    context_proto = ContextProto()
    context_proto.ParseFromString(new_context)
    context.state = context_from_proto(context_proto).state
    message_proto = MessageProto()
    message_proto.ParseFromString(reply)
    return message_from_proto(message_proto)


def _with_bytes_payloads(message: Message) -> Message:
    """Protobuf takes only bytes, and a packed block's payload is a numpy view (flower/records.py)."""
    if message.has_content():
        for record in message.content.array_records.values():
            for array in record.values():
                if not isinstance(array.data, bytes):
                    array.data = bytes(array.data)
    return message


def _start(path: Path, idle_s: float) -> socket.socket:
    """Start the worker unless another message's process just did; return a connection to it."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            try:
                return _connect(path)
            except ConnectionError:
                path.unlink()
        env = {**os.environ, IN_WORKER: "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        log_file = path.with_suffix(".log")
        with open(log_file, "a") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "deca_flower.flower.worker", str(path), "--idle-s", str(idle_s)],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)  # outlives this per-message process
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            if path.exists():
                try:
                    return _connect(path)
                except ConnectionError:
                    pass
            if worker.poll() is not None:
                raise WorkerError(f"warm worker exited with code {worker.returncode} while starting; see {log_file}")
            time.sleep(0.05)
    raise WorkerError(f"warm worker did not start within {START_TIMEOUT_S:.0f}s; see {log_file}")


def _connect(path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError) as err:
        conn.close()
        raise ConnectionError(str(err)) from err
    return conn


def _send(conn: socket.socket, frames: list[bytes]) -> None:
    for frame in frames:
        conn.sendall(_HEADER.pack(len(frame)) + frame)


def _receive(conn: socket.socket, count: int) -> list[bytes]:
    def exactly(n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = conn.recv(min(left, 1 << 24))
            if not chunk:
                raise EOFError("the worker closed the connection mid-message")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    return [exactly(_HEADER.unpack(exactly(_HEADER.size))[0]) for _ in range(count)]


def serve(path: Path, idle_s: float) -> None:
    """Answer messages one at a time with the project's ClientApp until idle for idle_s."""
    from apps.client_app import app  # the same ClientApp, mods and handlers as in simulation

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink(missing_ok=True)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen()
    listener.settimeout(idle_s)
    path.with_suffix(".pid").write_text(str(os.getpid()))
    log.info("warm worker %d listening on %s", os.getpid(), path)
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                log.info("idle for %.0fs: exiting", idle_s)
                return
            with conn:
                try:
                    _answer(app, conn)
                except (OSError, EOFError) as err:  # its process died (e.g. flwr stop): serve the next one
                    log.warning("a connection broke: %s", err)
    finally:
        listener.close()
        path.unlink(missing_ok=True)
        path.with_suffix(".pid").unlink(missing_ok=True)


def _answer(app: Any, conn: socket.socket) -> None:
    """One message in, its reply and the node's updated context out."""
    conn.settimeout(None)
    message_bytes, context_bytes = _receive(conn, 2)
    message_proto, context_proto = MessageProto(), ContextProto()
    message_proto.ParseFromString(message_bytes)
    context_proto.ParseFromString(context_bytes)
    context, message = context_from_proto(context_proto), message_from_proto(message_proto)
    try:
        reply = app(message=message, context=context)
    except Exception as err:  # as flwr-clientapp does: an error reply, node state unchanged
        log.exception("ClientApp raised")
        context = context_from_proto(context_proto)
        reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err).__name__}: {err}"), reply_to=message)
    _send(conn, [message_to_proto(_with_bytes_payloads(reply)).SerializeToString(),
                 context_to_proto(context).SerializeToString()])


def main() -> None:
    parser = argparse.ArgumentParser(description="deca_flower warm node worker (started by the ClientApp)")
    parser.add_argument("socket", type=Path)
    parser.add_argument("--idle-s", type=float, default=900.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve(args.socket, args.idle_s)


if __name__ == "__main__":
    main()
