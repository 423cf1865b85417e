"""Where a node's ClientApp tasks run in deployment: in one long-lived process, not one per message.

Flower 1.41's SuperExec starts a fresh `flwr-clientapp` process for every message: it imports
Flower, installs the FAB, loads the app and (with deca_flower) hands the message to the node's
warm worker over a socket and the reply back, so each 85 MB block is serialised twice more.
This SuperExec is Flower's own (`run_superexec`: same flags, same task polling) with one
executor swapped: a ClientApp task runs here, through Flower's own task functions
(`pull_task_input`, `push_message`, `push_task_output`, task heartbeats), on a ClientApp loaded
once, so the node's model, moments and position stay warm in this process between messages.

- only ClientApp tasks of the first app (FAB hash) it ran; any other task, or a task of another
  app, goes to Flower's usual per-message process (which then uses the warm worker);
- an exception in the ClientApp is an error reply with the node's state unchanged, as in
  `flwr-clientapp`; if this process dies, `deca-flower-supernode` starts a new one, which
  restores the node from its on-disk state (flower/state.py).

`deca-flower-supernode` (flower/supernode.py) runs the same loop in a thread of the SuperNode
process (`serve_in_supernode`, its default) or starts it as a process in place of `flower-superexec`
(`--task-runner in-process`). In the SuperNode process a task's Runtime API calls go straight to
Flower's SuperNode handlers on the node's own state (`LocalRuntimeClient`): a block no longer
crosses HTTP twice more between the SuperNode and the runner.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from flwr.app import Error, Message
from flwr.cli.install import install_from_fab
from flwr.clientapp import ClientApp
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.message_pb2 import PullObjectResponse
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.error import ApiErrorCode, FlowerError
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.servicer.runtime import runtime_handlers as core_handlers
from flwr.supercore.superexec import run_superexec
from flwr.supercore.superexec.executor import LaunchResult
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec
from flwr.supercore.superexec.plugin import AutoExecPlugin
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.nodestate import NodeState, NodeStateFactory
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output
from flwr.supernode.servicer.runtime import runtime_handlers as supernode_handlers

from deca_flower.flower.supernode import LOCAL_WAIT_S  # waits on the node's own state: no request, so short
from deca_flower.flower.worker import run_here
from deca_flower.logs import use_flower_logging

log = logging.getLogger(__name__)

OBJECT_WAIT_S = 600.0  # an object still missing after this goes back to Flower's pull (retries, then an error)
RETRY_PAUSE_S = 1.0  # after a task failed to start


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
    Flower's own SuperNode handler on the node's state, authenticated by the task's token as over
    HTTP, without the HTTP request and the protobuf encoding around it."""

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
        deadline = time.monotonic() + OBJECT_WAIT_S
        while isinstance(response, PullObjectResponse) and response.object_found and not response.object_available \
                and time.monotonic() < deadline:
            time.sleep(LOCAL_WAIT_S)
            response = handler(request, self.state, task)
        return response

    def close(self) -> None:
        pass


class InProcessExecutor(SubprocessExecutor):
    """Flower's subprocess executor, except that this app's ClientApp tasks run in this process
    (given the SuperNode's `state`: this process is the SuperNode, and tasks use its state directly)."""

    def __init__(self, state: NodeState | None = None) -> None:
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
        client = LocalRuntimeClient(self.state, spec.token) if self.state is not None else \
            RuntimeHttpClient.from_server_address(
                server_address=spec.runtime_api_address, insecure=spec.insecure,
                root_certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
                interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                              RuntimeTokenHttpInterceptor(spec.token)],
                retry_invoker=make_simple_http_retry_invoker())
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
            except Exception as err:  # the coordinator sees no reply (a dropout); this process keeps serving
                log.exception("could not push the reply of task %d", spec.task_id)
                status, details = SubStatus.FAILED, f"reply not pushed: {type(err).__name__}: {err}"
            try:  # always: or the task stays open on the SuperNode until its heartbeat lapses
                push_task_output(client, context, status, details)
            except Exception:
                log.exception("could not push the output of task %d", spec.task_id)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()


def serve_in_supernode(state_factory: NodeStateFactory, runtime_api_address: str, insecure: bool,
                       root_certificates_path: str | None) -> None:
    """Flower's SuperExec loop (flwr/supercore/superexec/run_superexec.py), run in a thread of the
    SuperNode process: claim the node's next task from its state, run it (this app's ClientApp
    tasks here; others in Flower's per-message process, which reaches the Runtime API over HTTP).
    An unexpected error is logged and the loop goes on; the node's model stays in this process."""
    run_here()  # this process is the warm node: the ClientApp must not forward to a worker
    state = state_factory.state()
    executor = InProcessExecutor(state)
    plugin = AutoExecPlugin(runtime_api_address=runtime_api_address, insecure=insecure,
                            root_certificates_path=root_certificates_path, executor=executor)
    while True:
        try:
            executor.reconcile()
            task_types, agent_fabs = executor.get_eligible_capacity(
                set(plugin.supported_task_types), insecure=insecure, root_certificates_path=root_certificates_path)
            claimed = supernode_handlers.acquire_task(
                AcquireTaskRequest(supported_task_types=task_types, agentapp_fab_hashes=agent_fabs), state)
            if claimed.HasField("task") and claimed.token:
                plugin.launch_task(token=claimed.token, task=claimed.task)
            else:
                time.sleep(LOCAL_WAIT_S)
        except Exception:  # a task that cannot start expires on the SuperNode; this loop keeps serving
            log.exception("the in-SuperNode task runner failed to start a task")
            time.sleep(RETRY_PAUSE_S)


def main() -> None:
    """`flower-superexec` with the in-process executor (same command-line flags)."""
    from flwr.supercore.cli import flower_superexec

    use_flower_logging()
    run_here()  # this process is the warm node: the ClientApp must not forward to a worker
    # Flower's loop naps this long after every task, a message's launch included (default 1 s)
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.05")
    executor = InProcessExecutor()
    run_superexec.get_executor = lambda *args, **kwargs: executor
    sys.argv[0] = "flower-superexec"
    flower_superexec()


if __name__ == "__main__":
    main()
