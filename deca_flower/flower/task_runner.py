"""A SuperExec that runs the node's ClientApp tasks in its own long-lived process (deployment).

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

`deca-flower-supernode` (flower/supernode.py) starts it in place of `flower-superexec`.
"""

from __future__ import annotations

import logging
import os
import sys

from flwr.app import Error, Message
from flwr.cli.install import install_from_fab
from flwr.clientapp import ClientApp
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.superexec import run_superexec
from flwr.supercore.superexec.executor import LaunchResult
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from deca_flower.flower.worker import IN_WORKER

log = logging.getLogger(__name__)


class InProcessExecutor(SubprocessExecutor):
    """Flower's subprocess executor, except that this app's ClientApp tasks run in this process."""

    def __init__(self) -> None:
        self.fab_hash: str | None = None  # the app loaded here
        self.client_app: ClientApp | None = None

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP or spec.fab_hash is None or self.fab_hash not in (None, spec.fab_hash):
            return super().launch(spec)
        self.run_task(spec)
        return LaunchResult.accepted()

    def run_task(self, spec: ExecutionSpec) -> None:
        """One message: pull it with its context, run the ClientApp, push the reply and the context."""
        client = RuntimeHttpClient.from_server_address(
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
                push_task_output(client, context, status, details)
            except Exception:  # the SuperNode will see the task expire; this process keeps serving
                log.exception("could not push the reply of task %d", spec.task_id)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()


def main() -> None:
    """`flower-superexec` with the in-process executor (same command-line flags)."""
    from flwr.supercore.cli import flower_superexec

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ[IN_WORKER] = "1"  # this process is the warm node: the ClientApp must not forward to a worker
    executor = InProcessExecutor()
    run_superexec.get_executor = lambda *args, **kwargs: executor
    sys.argv[0] = "flower-superexec"
    flower_superexec()


if __name__ == "__main__":
    main()
