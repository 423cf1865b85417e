"""deca-flower-supernode: Flower's SuperNode with capped polling sleeps and the task runner (loopback tests run it for real)."""

import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from deca_flower.flower import supernode
from deca_flower.flower.supernode import LOCAL_WAIT_S, cap_polling_sleeps, main


def test_sleeps_are_capped_and_the_rest_of_time_is_untouched(monkeypatch):
    loop = types.ModuleType("loop")
    loop.time = time
    assert cap_polling_sleeps(loop, 0.3)
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    for seconds in (3, 0.5, 0.2, 0.001):  # Flower's idle poll of the SuperLink, then its waits on local state
        loop.time.sleep(seconds)
    assert slept == [0.3, LOCAL_WAIT_S, LOCAL_WAIT_S, 0.001]
    monkeypatch.undo()
    start = time.monotonic()
    assert loop.time.monotonic() >= start and loop.time.time() == pytest.approx(time.time(), abs=1.0)


def test_a_loop_that_does_not_use_the_time_module_is_left_alone():
    loop = types.ModuleType("loop")
    loop.time = object()
    before = loop.time
    assert not cap_polling_sleeps(loop, 0.01)
    assert loop.time is before


def test_the_pinned_flower_polls_with_time_sleep_in_the_patched_module():
    from flwr.supernode import start_client_internal

    assert start_client_internal.time is time
    source = Path(start_client_internal.__file__).read_text()
    assert "time.sleep(3)" in source  # the idle wait this command shortens
    assert "time.sleep(0.5)" in source  # the waits on local state, capped at LOCAL_WAIT_S


def test_a_bad_poll_interval_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--poll-interval-s", "0", "--insecure"])
    assert exit_info.value.code == 2
    assert "--poll-interval-s must be > 0" in capsys.readouterr().err


def test_the_superexec_is_swapped_for_the_runner_and_a_crash_looping_runner_is_given_up(caplog):
    gave_up = []
    launcher = supernode.TaskRunnerLauncher(runner=(sys.executable, "-c", "import sys; sys.exit(3)"),
                                            on_give_up=lambda: gave_up.append(True))
    other = launcher.Popen([sys.executable, "-c", "print('untouched')"], stdout=subprocess.PIPE)
    assert other.communicate()[0].strip() == b"untouched"
    first = launcher.Popen(["flower-superexec", "--insecure"])
    assert first.args == [sys.executable, "-c", "import sys; sys.exit(3)", "--insecure"]
    deadline = time.monotonic() + 10 + supernode.RESTART_PAUSE_S
    while "not restarting it" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "starting a new one" in caplog.text and "exited with 3 twice" in caplog.text
    assert gave_up == [True]  # the SuperNode stops instead of staying registered without a runner


def test_a_second_reply_to_a_message_is_dropped_by_the_supernode_state():
    from flwr.app import ConfigRecord, Error, Message, RecordDict
    from flwr.common.constant import ErrorCode
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    class State(InMemoryNodeState):  # patched here, not Flower's class for the rest of the tests
        pass

    assert supernode.refuse_second_replies(State)
    state = State(InMemoryObjectStore())
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    ask, gone = (Message(RecordDict({"c": ConfigRecord({"i": i})}), dst_node_id=1, message_type="query") for i in (1, 2))
    for message in (ask, gone):
        message.metadata.__dict__["_message_id"] = message.object_id
    state.store_message(ask)

    def reply(to: Message, text: str) -> Message:
        answer = Message(Error(ErrorCode.UNKNOWN, text), reply_to=to)
        answer.metadata.__dict__["_message_id"] = answer.object_id
        return answer

    assert state.store_message(reply(ask, "first")) is not None   # e.g. "ClientApp stopped responding"
    assert state.store_message(reply(ask, "second")) is None      # the restarted runner's, late
    assert state.store_message(reply(gone, "to a message it no longer has")) is None
    assert [m.error.reason for m in state.get_messages_legacy(is_reply=True)] == ["first"]


def test_tasks_run_in_a_thread_of_the_supernode_instead_of_a_superexec_process(monkeypatch):
    from deca_flower.flower import task_runner

    served = []
    monkeypatch.setattr(task_runner, "serve_in_supernode", lambda *args: served.append(args))
    started = []
    start = supernode.with_tasks_in_supernode(lambda **kwargs: started.append(kwargs))
    factory = object()
    start(state_factory=factory, runtime_api_address="0.0.0.0:9094", runtime_certificates=None,
          runtime_root_certificates_path=None, isolation="subprocess")
    deadline = time.monotonic() + 5
    while not served and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served == [(factory, "127.0.0.1:9094", True, None)]  # a bind-all address is reached on loopback
    assert started[0]["isolation"] == "process"  # so Flower starts no SuperExec process of its own
    start(state_factory=factory, runtime_api_address="0.0.0.0:9094", isolation="process")
    assert len(served) == 1 and started[1]["isolation"] == "process"  # an operator's own SuperExec: left alone


def test_a_task_in_the_supernode_reaches_flowers_handlers_on_the_node_state_with_its_token():
    from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.error import FlowerError
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState
    from flwr.supernode.servicer.runtime import runtime_handlers

    from deca_flower.flower.task_runner import LocalRuntimeClient, handler_for

    state = InMemoryNodeState(InMemoryObjectStore())
    state.create_task(TaskType.CLIENT_APP, run_id=7)
    claimed = runtime_handlers.acquire_task(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]), state)
    assert LocalRuntimeClient(state, claimed.token).SendTaskHeartbeat(SendTaskHeartbeatRequest()).success
    with pytest.raises(FlowerError, match="authentication failed"):
        LocalRuntimeClient(state, "a token nobody issued").SendTaskHeartbeat(SendTaskHeartbeatRequest())
    # every call Flower's ClientApp task functions make (flwr/supernode/runtime/run_clientapp.py)
    for method in ("PullTaskInput", "PullMessages", "PullObject", "ConfirmMessageReceived", "PushMessages",
                   "PushObject", "PushTaskOutput", "SendTaskHeartbeat"):
        assert callable(handler_for(f"/flwr.proto.Runtime/{method}"))
    with pytest.raises(NotImplementedError, match="NoSuchCall"):
        handler_for("/flwr.proto.Runtime/NoSuchCall")


def test_a_task_in_the_supernode_waits_for_an_object_the_node_is_still_downloading():
    """The SuperNode lists a message (and its task starts) before it has downloaded the message's
    objects; the in-SuperNode task waits on the node's store instead of Flower's 1 s pull retry."""
    import threading

    from flwr.app import ConfigRecord
    from flwr.proto.message_pb2 import PullObjectRequest
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.inflatable.inflatable_object import get_object_tree
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState
    from flwr.supernode.servicer.runtime import runtime_handlers

    from deca_flower.flower.task_runner import LocalRuntimeClient

    state = InMemoryNodeState(InMemoryObjectStore())
    state.create_task(TaskType.CLIENT_APP, run_id=7)
    claimed = runtime_handlers.acquire_task(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]), state)
    record = ConfigRecord({"step": 3})
    state.object_store.preregister(7, get_object_tree(record))  # listed, content not downloaded yet
    download = threading.Timer(0.2, state.object_store.put, (record.object_id, record.deflate()))
    download.start()
    response = LocalRuntimeClient(state, claimed.token).PullObject(PullObjectRequest(object_id=record.object_id))
    download.join()
    assert response.object_available and response.object_content == record.deflate()


def test_a_reply_that_cannot_be_pushed_still_closes_its_task_as_failed(monkeypatch):
    from flwr.common.constant import SubStatus

    from deca_flower.flower import task_runner

    outputs = []
    monkeypatch.setattr(task_runner, "LocalRuntimeClient", lambda state, token: types.SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(task_runner, "HeartbeatSender", lambda fn: types.SimpleNamespace(start=lambda: None,
                                                                                         is_running=False))
    monkeypatch.setattr(task_runner, "make_task_heartbeat_fn_http", lambda client: None)
    monkeypatch.setattr(task_runner, "pull_task_input", lambda client: ("message", "context", None, None))

    def push_message(client, reply, context):
        raise ConnectionError("SuperNode went away")

    monkeypatch.setattr(task_runner, "push_message", push_message)
    monkeypatch.setattr(task_runner, "push_task_output",
                        lambda client, context, status, details: outputs.append((status, details)))
    executor = task_runner.InProcessExecutor(state=object())
    executor.client_app, executor.fab_hash = (lambda message, context: "reply"), "fab"
    executor.run_task(types.SimpleNamespace(token="t", task_id=3))
    assert outputs == [(SubStatus.FAILED, "reply not pushed: ConnectionError: SuperNode went away")]
