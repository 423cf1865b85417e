"""deca-flower-supernode: Flower's SuperNode with capped polls and its ClientApp warm in the
SuperNode process (deca_flower/flower/internals/supernode.py); the loopback tests run it for real."""

import time
import types
from pathlib import Path

import pytest

from deca_flower.flower import internals
from deca_flower.flower.internals import supernode
from deca_flower.flower.internals.supernode import LOCAL_WAIT_S, CappedSleep
from deca_flower.flower.supernode import main


def test_sleeps_are_capped_and_the_rest_of_time_is_untouched(monkeypatch):
    loop = types.SimpleNamespace(time=CappedSleep(0.3))
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    for seconds in (3, 0.5, 0.2, 0.001):  # Flower's idle poll of the SuperLink, then its waits on local state
        loop.time.sleep(seconds)
    assert slept == [0.3, LOCAL_WAIT_S, LOCAL_WAIT_S, 0.001]
    monkeypatch.undo()
    start = time.monotonic()
    assert loop.time.monotonic() >= start and loop.time.time() == pytest.approx(time.time(), abs=1.0)


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


def test_tasks_run_in_a_thread_of_the_supernode_instead_of_a_superexec_process(monkeypatch):
    served = []
    monkeypatch.setattr(supernode, "serve_tasks", lambda *args: served.append(args))
    started = []
    start = supernode.with_tasks_in_supernode(lambda **kwargs: started.append(kwargs))
    node_state = object()
    factory = types.SimpleNamespace(state=lambda: node_state)
    start(state_factory=factory, runtime_api_address="0.0.0.0:9094", runtime_certificates=None,
          runtime_root_certificates_path=None, isolation="subprocess")
    deadline = time.monotonic() + 5
    while not served and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served == [(node_state, "127.0.0.1:9094", True, None)]  # a bind-all address is reached on loopback
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

    from deca_flower.flower.internals.supernode import LocalRuntimeClient, handler_for

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

    from deca_flower.flower.internals.supernode import LocalRuntimeClient

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

    outputs = []
    monkeypatch.setattr(supernode, "LocalRuntimeClient", lambda state, token: types.SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(supernode, "HeartbeatSender", lambda fn: types.SimpleNamespace(start=lambda: None,
                                                                                       is_running=False))
    monkeypatch.setattr(supernode, "make_task_heartbeat_fn_http", lambda client: None)
    monkeypatch.setattr(supernode, "pull_task_input", lambda client: ("message", "context", None, None))

    def push_message(client, reply, context):
        raise ConnectionError("SuperNode went away")

    monkeypatch.setattr(supernode, "push_message", push_message)
    monkeypatch.setattr(supernode, "push_task_output",
                        lambda client, context, status, details: outputs.append((status, details)))
    executor = supernode.WarmExecutor(state=object())
    executor.client_app, executor.fab_hash = (lambda message, context: "reply"), "fab"
    executor.run_task(types.SimpleNamespace(token="t", task_id=3))
    assert outputs == [(SubStatus.FAILED, "reply not pushed: ConnectionError: SuperNode went away")]


def test_an_untested_flower_turns_the_fast_paths_off_and_says_which_versions_work(monkeypatch, caplog):
    monkeypatch.setattr(internals.importlib.metadata, "version", lambda name: "1.43.0")
    internals.fast_paths.cache_clear()
    execs = []

    def execvp(program, argv):  # the real one replaces this process: nothing after it runs
        execs.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(internals.os, "execvp", execvp)
    try:
        with caplog.at_level("WARNING"):
            assert not internals.fast_paths()
        assert "Flower 1.43.0" in caplog.text and "flwr >= 1.41.0, < 1.43" in caplog.text
        assert "Off: relaying blocks by id" in caplog.text and "warm in-SuperNode ClientApp" in caplog.text
        pulled = []
        grid = types.SimpleNamespace(pull_messages=lambda ids: pulled.extend(ids) or [], _client=object())
        assert internals.pull_replies(grid, ["m1"]) == [] and pulled == ["m1"]  # Flower's own pull
        internals.confirm_after_push(grid)
        assert not internals.replies_in_memory(grid)
        with pytest.raises(SystemExit):
            internals.run_supernode(["--insecure"], 0.25)  # Flower's own SuperNode, as it is
        assert execs == [["flower-supernode", "--insecure"]]  # (from this environment's bin/ when it has one)
    finally:
        monkeypatch.undo()
        internals.fast_paths.cache_clear()
    assert internals.fast_paths()  # the installed Flower is a tested one
