"""A Grid that delivers messages by calling the ClientApp in this process (no Ray, no SuperLink).

It runs the real ServerApp coordinator, mods and handlers; node state lands in the same
process cache as in a one-actor simulation, so tests can compare it with the reference. An
exception in the ClientApp becomes an error reply, as Flower's engines make it.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message, RecordDict
from flwr.app.metadata import Metadata
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from deca_flower.protocol import messages as pm


class KilledRun(BaseException):
    """The ServerApp process died (kill -9): nothing after this point runs."""


class InProcessGrid:
    def __init__(self, client_app, num_nodes: int, run_id: int = 7, node_configs: dict | None = None) -> None:
        self.client_app = client_app
        self.run_id = run_id
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0  # set by a ServerApp process
        self.contexts = {
            100 + pid: Context(run_id=run_id, node_id=100 + pid, state=RecordDict(), run_config={},
                               node_config=(node_configs or {}).get(pid, {"partition-id": pid, "num-partitions": num_nodes}))
            for pid in range(num_nodes)
        }
        self.sent = 0
        self.drop_replies_from: set[int] = set()
        self.silent_after: dict[int, int] = {}  # node id -> train messages it answers before going down
        self.back_at: dict[int, int] = {}       # node id -> total train messages after which it is up again
        self.back_at_probe: dict[int, int] = {}  # node id -> rejoin probes it misses before it is up again
        self.crash_after: dict[int, int] = {}   # node id -> train messages it answers before crashing
        self.gone_after: dict[int, int] = {}    # node id -> train messages it answers before its SuperNode dies
        self.kill_after: int | None = None      # total train messages after which the whole run is killed
        self.trains: dict[int, int] = {}
        self.total_trains = 0
        self.down: set[int] = set()
        self.probes: dict[int, int] = {}  # node id -> rejoin probes sent to it while down
        self.replies: dict[str, Message] = {}   # message id -> reply not pulled yet

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def push_messages(self, messages):
        """Deliver each message now; its reply (if any) waits for pull_messages."""
        ids = []
        for msg in messages:
            self.sent += 1
            node_id = msg.metadata.dst_node_id
            delivered = Message(metadata=Metadata(
                run_id=self.run_id, message_id=f"m{self.sent}", src_node_id=0, dst_node_id=node_id,
                reply_to_message_id="", group_id="", created_at=0.0, ttl=3600.0,
                message_type=msg.metadata.message_type), content=msg.content)
            if node_id in self.down and msg.metadata.message_type == pm.RejoinProbe.MESSAGE_TYPE:
                self.probes[node_id] = self.probes.get(node_id, 0) + 1
            if node_id in self.down and (self.total_trains >= self.back_at.get(node_id, 1 << 30)
                                         or self.probes.get(node_id, 0) > self.back_at_probe.get(node_id, 1 << 30)):
                self.down.discard(node_id)
                self.silent_after.pop(node_id)
            ids.append(delivered.metadata.message_id)
            if node_id in self.down:
                continue  # a dead SuperNode: no reply at all
            if msg.metadata.message_type.startswith("train"):
                if self.total_trains == self.kill_after:
                    raise KilledRun(f"run killed after {self.total_trains} train messages")
                self.total_trains += 1
                self.trains[node_id] = self.trains.get(node_id, 0) + 1
                if self.trains[node_id] > self.silent_after.get(node_id, 1 << 30):
                    self.down.add(node_id)
                    continue
                if self.trains[node_id] > self.gone_after.get(node_id, 1 << 30):  # the SuperLink answers
                    self.replies[delivered.metadata.message_id] = Message(metadata=Metadata(
                        run_id=self.run_id, message_id="", src_node_id=SUPERLINK_NODE_ID, dst_node_id=0,
                        reply_to_message_id=delivered.metadata.message_id, group_id="", created_at=0.0, ttl=0.0,
                        message_type=delivered.metadata.message_type),
                        error=Error(ErrorCode.NODE_UNAVAILABLE, "Error: Node Unavailable"))
                    continue
                if self.trains[node_id] > self.crash_after.get(node_id, 1 << 30):
                    self.replies[delivered.metadata.message_id] = Message(
                        Error(0, "ClientApp raised RuntimeError: simulated crash"), reply_to=delivered)
                    continue
            try:
                reply = self.client_app(delivered, self.contexts[node_id])
            except Exception as err:
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err).__name__}: {err}"),
                                reply_to=delivered)
            if node_id not in self.drop_replies_from:
                self.replies[delivered.metadata.message_id] = reply
        return ids
