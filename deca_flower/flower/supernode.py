"""`deca-flower-supernode`: Flower's `flower-supernode` without its fixed polling naps, with a warm task runner.

Flower 1.41's SuperNode loop (flwr/supernode/start_client_internal.py) sleeps a fixed 3 s each
time the SuperLink has no message for it and 0.5 s between checks for its ClientApp's reply,
and neither is configurable. DECA sends each node one message per inner step, so a node waits
~3 s per step for nothing. This command runs the very same `flower-supernode` (same flags) with
every sleep of that polling loop capped at `--poll-interval-s` (default 0.25 s): the node asks
the SuperLink more often, nothing else changes. Its short waits (<= 0.5 s) look only at the
SuperNode's own in-memory state (has the ClientApp replied?), so they are capped at 10 ms.

A reply to a message that already has one is dropped: when a task's heartbeat expires (its
process died), Flower's SuperNode answers every open message of the run on that node with
"ClientApp stopped responding", including one a restarted runner is still working on; that
runner's own reply then arrived second, and the SuperNode's loop (one message in, one reply out)
sent it in place of the next reply and stayed one reply behind from then on.

The node's ClientApp runs warm, with its model and moments kept between messages
(flower/task_runner.py), where `--task-runner` says:
- `in-supernode` (default): in a thread of this SuperNode process, in place of the SuperExec
  process Flower would start; a task reads its message from the node's own state and object
  store, so a block crosses no further HTTP hop on the node;
- `in-process`: in one runner process started as the SuperNode's SuperExec (in place of
  `flower-superexec`) and started again if it dies; it restores the node from its on-disk state
  (a runner that dies twice within QUICK_EXIT_S of starting ends this SuperNode instead, for its
  supervisor, e.g. compose's `restart: unless-stopped`, to start again);
- `per-message`: Flower's way, a new `flwr-clientapp` process per message (which reaches the
  node's warm worker, flower/worker.py).

    deca-flower-supernode --poll-interval-s 0.25 --insecure --superlink 127.0.0.1:9092 --node-config "..."
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL_S = 0.25
RESTART_PAUSE_S = 1.0
LOCAL_WAIT_S = 0.01  # cap of a wait on the SuperNode's own state: no request, so it may be short
QUICK_EXIT_S = 10.0  # a runner that dies this soon after starting, twice running, is not restarted again


class CappedSleep:
    """Stands in for the `time` module inside one Flower module: `sleep` waits at most `cap_s`, and
    a wait of up to 0.5 s (Flower's on local state) at most LOCAL_WAIT_S."""

    def __init__(self, cap_s: float) -> None:
        self.cap_s = cap_s

    def sleep(self, seconds: float) -> None:
        cap = min(self.cap_s, LOCAL_WAIT_S) if seconds <= 0.5 else self.cap_s
        time.sleep(min(seconds, cap))

    def __getattr__(self, name: str):
        return getattr(time, name)


def cap_polling_sleeps(loop_module: ModuleType, cap_s: float) -> bool:
    """Cap the sleeps of Flower's SuperNode polling loop; False (and unchanged) if it is not as expected."""
    if getattr(loop_module, "time", None) is not time:
        return False
    loop_module.time = CappedSleep(cap_s)
    return True


def refuse_second_replies(state_class: type) -> bool:
    """Make `state_class.store_message` drop a reply whose message is answered or gone; False (and
    unchanged) if the class does not keep messages as Flower 1.41's InMemoryNodeState does."""
    init = inspect.getsource(state_class.__init__)
    if "self.msg_store" not in init or "self.lock_msg_store = RLock()" not in init:
        return False
    store_message = state_class.store_message

    def store_first_reply(self, message):
        reply_to = message.metadata.reply_to_message_id
        with self.lock_msg_store:  # an RLock, held by Flower's callers too
            if reply_to and (reply_to not in self.msg_store or any(
                    entry.message.metadata.reply_to_message_id == reply_to for entry in self.msg_store.values())):
                log.warning("dropping a second reply to message %s: it was answered already "
                            "(\"ClientApp stopped responding\" after a task runner died)", reply_to)
                return None
            return store_message(self, message)

    state_class.store_message = store_first_reply
    return True


class TaskRunnerLauncher:
    """Stands in for `subprocess` inside Flower's SuperNode module: its SuperExec becomes the task runner."""

    def __init__(self, runner: tuple[str, ...] = (sys.executable, "-m", "deca_flower.flower.task_runner"),
                 on_give_up: Callable[[], None] = lambda: os.kill(os.getpid(), signal.SIGTERM)) -> None:
        self.runner = runner
        self.on_give_up = on_give_up  # default: end this SuperNode, so that its supervisor can start it again

    def Popen(self, command, *args, **kwargs):  # noqa: N802 (the name Flower calls)
        if not command or command[0] != "flower-superexec":
            return subprocess.Popen(command, *args, **kwargs)
        command = [*self.runner, *command[1:]]  # same flags as flower-superexec
        process = subprocess.Popen(command, *args, **kwargs)
        threading.Thread(target=self._keep_running, args=(process, command, args, kwargs), daemon=True).start()
        return process

    def _keep_running(self, process: subprocess.Popen, command: list[str], args: tuple, kwargs: dict) -> None:
        quick_exits = 0
        while True:
            started = time.monotonic()
            code = process.wait()
            quick_exits = quick_exits + 1 if time.monotonic() - started < QUICK_EXIT_S else 0
            if quick_exits >= 2:
                log.error("the task runner exited with %s twice within %.0fs of starting: not restarting it "
                          "(its output is in this SuperNode's log); stopping this SuperNode, which would "
                          "otherwise stay registered with nothing to run its messages", code, QUICK_EXIT_S)
                self.on_give_up()
                return
            log.warning("the task runner exited with %s: starting a new one (it restores the node from disk)", code)
            time.sleep(RESTART_PAUSE_S)
            process = subprocess.Popen(command, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(subprocess, name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="deca-flower-supernode", add_help=False,
                                     description="flower-supernode (all its flags, below) with shorter polling waits")
    parser.add_argument("--poll-interval-s", type=float, default=DEFAULT_POLL_INTERVAL_S,
                        help=f"longest wait between polls of the SuperLink and the ClientApp (default {DEFAULT_POLL_INTERVAL_S})")
    parser.add_argument("--task-runner", choices=("in-supernode", "in-process", "per-message"),
                        default="in-supernode",
                        help="in-supernode: the ClientApp runs warm in this SuperNode process (default); "
                             "in-process: in one warm SuperExec process, restarted if it dies; "
                             "per-message: Flower's flwr-clientapp process per message")
    args, flower_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.poll_interval_s <= 0:
        parser.error(f"--poll-interval-s must be > 0, got {args.poll_interval_s}")
    if {"-h", "--help"} & set(flower_args):
        print(parser.format_help())  # then flower-supernode prints its own flags and exits

    from flwr.supernode import start_client_internal
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    from deca_flower.logs import use_flower_logging

    use_flower_logging()  # the node's own log lines (a restore, a dropped reply) in the SuperNode's log
    supernode_cli = importlib.import_module("flwr.supernode.cli.flower_supernode")  # the module, not the function
    if not cap_polling_sleeps(start_client_internal, args.poll_interval_s):
        log.warning("this Flower's SuperNode loop does not use `time` as 1.41 does; polling waits left as they are")
    if not refuse_second_replies(InMemoryNodeState):
        log.warning("this Flower's SuperNode state is not 1.41's: a second reply to a message is not dropped")
    if args.task_runner == "in-supernode":
        supernode_cli.start_client_internal = with_tasks_in_supernode(supernode_cli.start_client_internal)
    elif args.task_runner == "in-process":
        if getattr(start_client_internal, "subprocess", None) is subprocess:
            start_client_internal.subprocess = TaskRunnerLauncher()
        else:
            log.warning("this Flower's SuperNode does not start its SuperExec as 1.41 does: per-message ClientApps")
    sys.argv = ["flower-supernode", *flower_args]
    supernode_cli.flower_supernode()


def with_tasks_in_supernode(start: Callable[..., None]) -> Callable[..., None]:
    """Wrap Flower's `start_client_internal` so that the node's tasks run in a thread of this
    process (task_runner.serve_in_supernode) instead of a SuperExec process it would start."""
    from flwr.common.constant import ISOLATION_MODE_PROCESS, ISOLATION_MODE_SUBPROCESS
    from flwr.supercore.address import resolve_bind_address

    from deca_flower.flower.task_runner import serve_in_supernode

    def start_with_tasks_here(**kwargs: Any) -> None:
        if kwargs.get("isolation", ISOLATION_MODE_SUBPROCESS) == ISOLATION_MODE_SUBPROCESS:
            runtime = (kwargs["state_factory"], resolve_bind_address(kwargs["runtime_api_address"]),
                       kwargs.get("runtime_certificates") is None, kwargs.get("runtime_root_certificates_path"))
            threading.Thread(target=serve_in_supernode, args=runtime, name="deca-task-runner", daemon=True).start()
            kwargs["isolation"] = ISOLATION_MODE_PROCESS  # Flower then starts no SuperExec of its own
        start(**kwargs)

    return start_with_tasks_here


if __name__ == "__main__":
    main()
