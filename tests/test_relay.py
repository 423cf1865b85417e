"""Relaying a block does not upload it again: the ServerApp holds its reply confirmations until
after the push that relays the blocks, and pulls replies without their chunks
(deca_flower/flower/internals/relay.py), on Flower's own object store."""

import time
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ConfigRecord, Message, Metadata, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.app.message.arraychunk import ArrayChunk
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_to_proto
from flwr.proto.message_pb2 import PullObjectResponse
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
from flwr.supercore.run import Run
from flwr.superlink.grid.http_grid import HttpGrid

from deca_flower.flower.internals.relay import (
    HeldConfirmations,
    RelayedArray,
    RelayError,
    confirm_after_push,
    pull_replies,
    stop_holding,
)
from deca_flower.protocol import messages as pm
from deca_flower.protocol.packing import PACKED_KEY, record_bytes
from deca_flower.protocol.tensors import block_to_record, record_to_block

HALF, NEIGHBOUR_HALF = "deca.half", "deca.halves.0"  # a StepResult's half; a TrainStep's half from node 0


class RuntimeClient:
    def __init__(self) -> None:
        self.confirmed: list[str] = []

    def ConfirmMessageReceived(self, request: str) -> None:  # noqa: N802
        self.confirmed.append(request)

    def PullObject(self, request: str) -> str:  # noqa: N802
        return f"object {request}"


def test_confirmations_wait_for_the_next_push():
    client = RuntimeClient()
    grid = HttpGrid(token="t")
    grid._client = client
    confirm_after_push(grid)  # first push: from now on confirmations are held
    assert isinstance(grid._client, HeldConfirmations)
    grid._client.ConfirmMessageReceived("reply 1")
    grid._client.ConfirmMessageReceived("reply 2")
    assert grid._client.PullObject("x") == "object x"  # everything else goes straight through
    assert client.confirmed == []
    confirm_after_push(grid)  # the push that relays their blocks
    assert client.confirmed == ["reply 1", "reply 2"]
    grid._client.ConfirmMessageReceived("reply 3")
    stop_holding(grid)  # a Flower strategy takes over the grid: it confirms as Flower does
    assert grid._client is client and client.confirmed == ["reply 1", "reply 2", "reply 3"]
    other = SimpleNamespace(_client=client)
    confirm_after_push(other)  # grids other than Flower's deployment grid are left alone
    assert other._client is client


def _store(store: InMemoryObjectStore, message: RecordDict) -> list[str]:
    missing = store.preregister(0, get_object_tree(message))
    for object_id, obj in get_all_nested_objects(message).items():
        if object_id in missing:
            store.put(object_id, obj.deflate())
    return missing


def test_superlink_store_needs_no_upload_of_a_relayed_block_while_its_reply_is_held():
    """Flower's own object store: what a push of the relay message must upload. (Each message's
    content stands in for the message: the tree below it is the same.)"""
    block = block_to_record({"w": torch.randn(4096)})
    block_ids = set(get_all_nested_objects(block))
    for held in (True, False):
        store = InMemoryObjectStore()
        reply = RecordDict({HALF: block, pm.FIELDS: ConfigRecord({"loss": 1.0})})
        _store(store, reply)
        relay = RecordDict({NEIGHBOUR_HALF: reply[HALF], pm.FIELDS: ConfigRecord({"step": 1})})
        if not held:  # Flower's grid confirms at pull: the SuperLink deletes the reply's objects
            store.delete(reply.object_id)
        to_upload = set(store.preregister(0, get_object_tree(relay)))
        assert (to_upload & block_ids == set()) if held else (block_ids <= to_upload)
        if held:
            store.delete(reply.object_id)  # confirmed after the push: the relay message keeps the block
            assert all(store.get(i) for i in block_ids)


class SuperLinkStub:
    """The Runtime API calls `pull_replies` makes, served from Flower's own object store."""

    def __init__(self, store: InMemoryObjectStore, replies: list[Message]) -> None:
        self.store, self.replies, self.pulled, self.confirmed = store, replies, [], []

    def PullMessages(self, request):  # noqa: N802
        wanted = [m for m in self.replies if m.metadata.reply_to_message_id in request.message_ids]
        return SimpleNamespace(messages_list=[message_to_proto(remove_content_from_message(m)) for m in wanted],
                               message_object_trees=[get_object_tree(m) for m in wanted])

    def PullObject(self, request):  # noqa: N802 (as Flower's handler: found once preregistered, available once put)
        self.pulled.append(request.object_id)
        content = self.store.get(request.object_id)
        return PullObjectResponse(object_found=content is not None, object_available=bool(content),
                                  object_content=content or b"")

    def ConfirmMessageReceived(self, request):  # noqa: N802
        self.confirmed.append(request.message_object_id)


def _reply_with_block(block: dict) -> Message:
    metadata = Metadata(run_id=1, message_id="", src_node_id=7, dst_node_id=0, reply_to_message_id="a" * 64,
                        group_id="", created_at=0.0, ttl=60.0, message_type=pm.TrainStep.MESSAGE_TYPE)
    reply = Message(metadata=metadata, content=pm.StepResult(half=block_to_record(block), loss=1.0, step_s=0.1,
                                                            opt_bytes=0.0).to_content())
    reply.metadata.__dict__["_message_id"] = reply.object_id
    return reply


def _grid(store: InMemoryObjectStore, reply: Message) -> HttpGrid:
    """Flower's deployment grid, talking to a SuperLink that holds `reply` in `store`."""
    grid = HttpGrid(token="t")
    grid._client, grid._run = SuperLinkStub(store, [reply]), Run.create_empty(1)
    return grid


def test_replies_are_pulled_without_their_chunks_and_relayed_by_id(monkeypatch):
    # Prepare: a reply whose block spans several chunks, on the SuperLink
    monkeypatch.setattr("flwr.app.message.array.FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", 4096)
    block = {"w": torch.randn(3000), "b": torch.randn(7)}
    reply = _reply_with_block(block)
    store = InMemoryObjectStore()
    _store(store, reply)
    chunk_ids = {i for i, o in get_all_nested_objects(reply).items() if isinstance(o, ArrayChunk)}
    assert len(chunk_ids) >= 3
    grid = _grid(store, reply)

    # Execute
    [pulled] = pull_replies(grid, [reply.metadata.reply_to_message_id])

    # Assert: nothing of the block's bytes came down, yet the relay message names the same objects
    assert not chunk_ids & set(grid._client.pulled)
    assert grid._client.confirmed == [reply.object_id]
    half = pm.StepResult.from_content(pulled.content).half
    assert isinstance(half[PACKED_KEY], RelayedArray)
    assert record_bytes(half) == record_bytes(reply.content[HALF])
    relay = pm.TrainStep(step=1, self_weight=0.5, weights={0: 0.5}, halves={0: half}).to_content()
    assert half.object_id == reply.content[HALF].object_id
    to_upload = set(store.preregister(0, get_object_tree(relay)))
    assert not to_upload & set(get_all_nested_objects(reply.content[HALF]))
    # reading the data fetches the chunks once, and they decode to the block
    decoded = record_to_block(half, "node 0")
    assert chunk_ids <= set(grid._client.pulled)
    assert all(torch.equal(decoded[k], block[k]) for k in block)


def test_a_relayed_chunk_the_superlink_no_longer_holds_is_an_error():
    reply = _reply_with_block({"w": torch.randn(64)})
    store = InMemoryObjectStore()
    _store(store, reply)
    grid = _grid(store, reply)
    [pulled] = pull_replies(grid, [reply.metadata.reply_to_message_id])
    store.delete(reply.object_id)  # confirmed too early: the SuperLink dropped the block
    relay = RecordDict({NEIGHBOUR_HALF: pulled.content[HALF]})
    to_upload = get_all_nested_objects(relay)
    with pytest.raises(RelayError, match="no longer holds"):
        for object_id in store.preregister(0, get_object_tree(relay)):
            to_upload[object_id].deflate()
    with pytest.raises(RelayError, match="no longer on the SuperLink"):
        record_to_block(pulled.content[HALF], "node 0")


def test_a_reply_whose_objects_are_gone_becomes_an_error_reply_from_its_node():
    reply = _reply_with_block({"w": torch.randn(64)})
    store = InMemoryObjectStore()
    _store(store, reply)
    store.delete(reply.object_id)  # e.g. the SuperLink dropped it after its TTL
    grid = _grid(store, reply)
    [pulled] = pull_replies(grid, [reply.metadata.reply_to_message_id])
    assert pulled.has_error() and pulled.error.code == ErrorCode.MESSAGE_UNAVAILABLE
    assert pulled.metadata.src_node_id == 7  # the coordinator drops or stops on that node, by its id
    assert pulled.metadata.reply_to_message_id == reply.metadata.reply_to_message_id
    assert grid._client.confirmed == []


def _still_uploading(looks: int) -> tuple[Message, HttpGrid]:
    """A reply on a SuperLink whose message object is missing for the first `looks` looks."""
    reply = _reply_with_block({"w": torch.randn(64)})
    store = InMemoryObjectStore()
    _store(store, reply)
    grid = _grid(store, reply)
    pull_object = grid._client.PullObject

    def uploading(request):
        if request.object_id == reply.object_id and grid._client.pulled.count(reply.object_id) < looks:
            grid._client.pulled.append(request.object_id)
            return PullObjectResponse(object_found=True, object_available=False)  # preregistered, not uploaded
        return pull_object(request)

    grid._client.PullObject = uploading
    return reply, grid


def test_a_reply_still_uploading_is_pulled_as_soon_as_its_message_object_is_in():
    """The SuperLink lists a reply once its node pushed the message, before the node has uploaded
    the objects (the message object last). Flower's pull retries a missing object after 1 s, then
    2 s: here the root is missing for the first three looks, and the pull takes well under 1 s."""
    reply, grid = _still_uploading(looks=3)
    started = time.monotonic()
    [pulled] = pull_replies(grid, [reply.metadata.reply_to_message_id])
    assert time.monotonic() - started < 1.0
    assert grid._client.pulled.count(reply.object_id) == 4
    assert torch.equal(record_to_block(pulled.content[HALF], "node 7")["w"],
                       record_to_block(reply.content[HALF], "node 7")["w"])


def test_a_slow_upload_is_waited_for_by_time_not_by_a_count_of_looks(monkeypatch):
    # Flower's pull gives up after 500 looks per object: at 0.05 s apart that is ~25 s, not
    # UPLOAD_WAIT_S; a block uploading for longer (a large model, a slow link) must still arrive
    monkeypatch.setattr("deca_flower.flower.internals.relay.UPLOAD_RETRY_S", 1e-5)
    monkeypatch.setattr("deca_flower.flower.internals.relay.UPLOAD_RETRY_CAP_S", 1e-5)
    reply, grid = _still_uploading(looks=600)
    [pulled] = pull_replies(grid, [reply.metadata.reply_to_message_id])
    assert not pulled.has_error()
    assert grid._client.pulled.count(reply.object_id) == 601


def test_the_relay_refuses_a_half_of_another_size_than_its_block(tiny_cfg, tmp_path):
    """Every node reports the size of each block's half at setup; a node that sends more (a hostile
    node filling its neighbours' memory) is named, and its half reaches no neighbour."""
    from apps.client_app import app as client_app
    from deca_flower.flower.transport import CoordinationError
    from tests.test_bad_input import started_coordinator

    coordinator, grid = started_coordinator(tiny_cfg, tmp_path)

    def oversized(msg, context):
        reply = client_app(msg, context)
        if context.node_id == coordinator.membership.node_of[2] and HALF in reply.content:
            reply.content[HALF] = block_to_record({"w": torch.zeros(100_000)})
        return reply

    grid.client_app = oversized
    expected = coordinator.membership.half_bytes[1]
    refused = f"node 2 sent a half of block 1 of 400040 bytes, expected {expected}: not relayed"
    with pytest.raises(CoordinationError, match=refused):
        coordinator.exchange(block=1, start=True)
    assert coordinator.progress.halves == {}  # nothing of that step is relayed
