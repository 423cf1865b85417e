"""`deca-flower-supernode`'s fast paths: Flower's own SuperNode (same flags, same code) with the
naps of its polling loop capped and its ClientApp tasks run warm in the SuperNode process.

- Capped polls. Flower's SuperNode loop (flwr/supernode/start_client_internal.py) sleeps 3 s
  whenever the SuperLink has no message for it and 0.5 s between looks at its own state, neither
  configurable; DECA sends each node one message per inner step. Its `time` module is swapped for
  `CappedSleep`: the node asks the SuperLink every `poll_interval_s`, its own state every 10 ms.
- Tasks in the SuperNode. Flower's SuperExec would start a fresh `flwr-clientapp` process for every
  message: imports, the FAB, the model loaded again. `serve_tasks` runs Flower's SuperExec loop in
  a thread of the SuperNode process instead: the ClientApp tasks of the first app it meets run here,
  through Flower's own task functions, on a ClientApp loaded once, so the node's model, moments
  and position stay warm; each Runtime API call goes straight to Flower's SuperNode handler on the
  node's state (`LocalRuntimeClient`: no HTTP, the task's token checked as over HTTP). Any other
  task gets Flower's process per task. A ClientApp exception is an error reply with the node's
  state unchanged, as in `flwr-clientapp`; if the SuperNode dies, the node's warm state goes with
  it, and a SuperNode started again (e.g. compose's restart policy) rejoins at a block boundary.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from flwr.app import Error, Message
from flwr.cli.install import install_from_fab
from flwr.clientapp import ClientApp
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ISOLATION_MODE_PROCESS, ISOLATION_MODE_SUBPROCESS, ErrorCode, SubStatus
from flwr.proto.message_pb2 import PullObjectResponse
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.address import resolve_bind_address
from flwr.supercore.constant import TaskType
from flwr.supercore.error import ApiErrorCode, FlowerError
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.servicer.runtime import runtime_handlers as core_handlers
from flwr.supercore.superexec.executor import LaunchResult
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec
from flwr.supercore.superexec.plugin import AutoExecPlugin
from flwr.supernode import start_client_internal
from flwr.supernode.nodestate import NodeState
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output
from flwr.supernode.servicer.runtime import runtime_handlers as supernode_handlers

log = logging.getLogger(__name__)

LOCAL_WAIT_S = 0.01  # cap of a wait on the SuperNode's own state: no request, so it may be short
RETRY_PAUSE_S = 1.0  # after a task failed to start


class CappedSleep:
    """Stands in for the `time` module inside Flower's SuperNode loop: `sleep` waits at most `cap_s`,
    and a wait of up to 0.5 s (Flower's, on the node's own state) at most LOCAL_WAIT_S."""

    def __init__(self, cap_s: float) -> None:
        self.cap_s = cap_s

    def sleep(self, seconds: float) -> None:
        cap = min(self.cap_s, LOCAL_WAIT_S) if seconds <= 0.5 else self.cap_s
        time.sleep(min(seconds, cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def run(flower_args: list[str], poll_interval_s: float) -> None:
    """Flower's `flower-supernode` with these arguments, polls capped, tasks in this process."""
    supernode_cli = importlib.import_module("flwr.supernode.cli.flower_supernode")  # the module, not the function
    start_client_internal.time = CappedSleep(poll_interval_s)
    supernode_cli.start_client_internal = with_tasks_in_supernode(supernode_cli.start_client_internal)
    sys.argv = ["flower-supernode", *flower_args]
    supernode_cli.flower_supernode()


def with_tasks_in_supernode(start: Callable[..., None]) -> Callable[..., None]:
    """Wrap Flower's `start_client_internal` so that the node's tasks run in a thread of this process
    (`serve_tasks`) instead of a SuperExec process it would start. An operator's own SuperExec
    (`--isolation process`) is left to run them."""

    def start_with_tasks_here(**kwargs: Any) -> None:
        if kwargs.get("isolation", ISOLATION_MODE_SUBPROCESS) == ISOLATION_MODE_SUBPROCESS:
            runtime_api = (resolve_bind_address(kwargs["runtime_api_address"]),  # for tasks run in their own process
                           kwargs.get("runtime_certificates") is None, kwargs.get("runtime_root_certificates_path"))
            threading.Thread(target=serve_tasks, args=(kwargs["state_factory"].state(), *runtime_api),
                             name="deca-tasks", daemon=True).start()
            kwargs["isolation"] = ISOLATION_MODE_PROCESS  # Flower then starts no SuperExec of its own
        start(**kwargs)

    return start_with_tasks_here


@functools.cache
def handler_for(rpc_method: str) -> Callable[..., Any]:
    """Flower's SuperNode handler of a Runtime API call, e.g. "/flwr.proto.Runtime/PullObject"."""
    name = re.sub(r"(?<!^)(?=[A-Z])", "_", rpc_method.rsplit("/", 1)[-1]).lower()  # PullObject -> pull_object
    handler = getattr(supernode_handlers, name, None) or getattr(core_handlers, name, None)
    if handler is None:
        raise NotImplementedError(f"no SuperNode handler for the Runtime API call {rpc_method}")
    return handler


class LocalRuntimeClient(RuntimeHttpClient):
    """The Runtime API client of a task that runs inside the SuperNode process: every call goes to
    Flower's own SuperNode handler on the node's state, authenticated by the task's token."""

    def __init__(self, state: NodeState, token: str) -> None:  # no HTTP client to open
        self.state, self.token = state, token

    def _unary_unary(self, *, path, rpc_method, request, response_type, timeout=None):
        task = self.state.get_task_by_token(self.token)
        if task is None:
            raise FlowerError(ApiErrorCode.RUNTIME_AUTHENTICATION_FAILED, "Runtime task-token authentication failed.")
        handler = handler_for(rpc_method)
        response = handler(request, self.state, task)
        # The SuperNode lists a message before it has downloaded the message's objects. Flower's pull
        # retries a missing object after 1 s; here the wait is on the node's own store, so it is short.
        while isinstance(response, PullObjectResponse) and response.object_found and not response.object_available:
            time.sleep(LOCAL_WAIT_S)
            response = handler(request, self.state, task)
        return response

    def close(self) -> None:
        pass


class WarmExecutor(SubprocessExecutor):
    """Flower's subprocess executor, except that the ClientApp tasks of the first app (FAB) it meets
    run in this process, on the node's state."""

    def __init__(self, state: NodeState) -> None:
        self.state = state
        self.fab_hash: str | None = None  # the app loaded here
        self.client_app: ClientApp | None = None

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP or spec.fab_hash is None or self.fab_hash not in (None, spec.fab_hash):
            return super().launch(spec)
        self.run_task(spec)
        return LaunchResult.accepted()

    def run_task(self, spec: ExecutionSpec) -> None:
        """One message: pull it with its context, run the ClientApp, push the reply and the context."""
        client = LocalRuntimeClient(self.state, spec.token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = reply = context = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        try:
            message, context, run, fab = pull_task_input(client)
            if self.client_app is None:
                install_from_fab(fab.content, skip_prompt=True)
                load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
                self.client_app, self.fab_hash = load(run.fab_id, run.fab_version, fab.hash_str), fab.hash_str
            reply = self.client_app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as err:  # as flwr-clientapp does: an error reply, the node's state unchanged
            log.exception("ClientApp raised")
            details = f"{type(err).__name__}: {err}"
            if message is not None:
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as err:  # the coordinator sees no reply (a dropout); the node keeps serving
                log.exception("could not push the reply of task %d", spec.task_id)
                status, details = SubStatus.FAILED, f"reply not pushed: {type(err).__name__}: {err}"
            try:  # always: or the task stays open on the SuperNode until its heartbeat lapses
                push_task_output(client, context, status, details)
            except Exception:
                log.exception("could not push the output of task %d", spec.task_id)
            if heartbeat.is_running:
                heartbeat.stop()


def serve_tasks(state: NodeState, runtime_api_address: str, insecure: bool, root_certificates_path: str | None) -> None:
    """Flower's SuperExec loop (flwr/supercore/superexec/run_superexec.py) in a thread of the SuperNode:
    claim the node's next task from its state and launch it. An unexpected error is logged and the
    loop goes on; the node's model stays in this process."""
    executor = WarmExecutor(state)
    plugin = AutoExecPlugin(runtime_api_address=runtime_api_address, insecure=insecure,
                            root_certificates_path=root_certificates_path, executor=executor)
    while True:
        try:
            task_types, agent_fabs = executor.get_eligible_capacity(set(plugin.supported_task_types))
            claimed = supernode_handlers.acquire_task(
                AcquireTaskRequest(supported_task_types=task_types, agentapp_fab_hashes=agent_fabs), state)
            if claimed.HasField("task") and claimed.token:
                plugin.launch_task(token=claimed.token, task=claimed.task)
            else:
                time.sleep(LOCAL_WAIT_S)
        except Exception:  # a task that cannot start expires on the SuperNode; this loop keeps serving
            log.exception("the in-SuperNode task loop failed to start a task")
            time.sleep(RETRY_PAUSE_S)
