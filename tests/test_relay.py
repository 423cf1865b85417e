"""Relaying a block does not upload it again: the ServerApp holds its reply confirmations until
after the push that relays the blocks (deca_flower/flower/relay.py)."""

from types import SimpleNamespace

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore

from deca_flower.flower import records as rk
from deca_flower.flower.relay import HeldConfirmations, confirm_after_push


class RuntimeClient:
    def __init__(self) -> None:
        self.confirmed: list[str] = []

    def ConfirmMessageReceived(self, request: str) -> None:  # noqa: N802
        self.confirmed.append(request)

    def PullObject(self, request: str) -> str:  # noqa: N802
        return f"object {request}"


def test_confirmations_wait_for_the_next_push():
    client = RuntimeClient()
    grid = SimpleNamespace(_client=client)
    confirm_after_push(grid)  # first push: from now on confirmations are held
    assert isinstance(grid._client, HeldConfirmations)
    grid._client.ConfirmMessageReceived("reply 1")
    grid._client.ConfirmMessageReceived("reply 2")
    assert grid._client.PullObject("x") == "object x"  # everything else goes straight through
    assert client.confirmed == []
    confirm_after_push(grid)  # the push that relays their blocks
    assert client.confirmed == ["reply 1", "reply 2"]
    confirm_after_push(SimpleNamespace())  # grids without a Runtime API client are left alone


def _store(store: InMemoryObjectStore, message: RecordDict) -> list[str]:
    missing = store.preregister(0, get_object_tree(message))
    for object_id, obj in get_all_nested_objects(message).items():
        if object_id in missing:
            store.put(object_id, obj.deflate())
    return missing


def test_superlink_store_needs_no_upload_of_a_relayed_block_while_its_reply_is_held():
    """Flower's own object store: what a push of the relay message must upload. (Each message's
    content stands in for the message: the tree below it is the same.)"""
    block = rk.block_to_record({"w": torch.randn(4096)})
    block_ids = set(get_all_nested_objects(block))
    for held in (True, False):
        store = InMemoryObjectStore()
        reply = RecordDict({rk.HALF: block, rk.METRICS: MetricRecord({"loss": 1.0})})
        _store(store, reply)
        relay = RecordDict({f"{rk.NEIGHBOUR_PREFIX}0": reply[rk.HALF], rk.CONFIG: ConfigRecord({"step": 1})})
        if not held:  # Flower's grid confirms at pull: the SuperLink deletes the reply's objects
            store.delete(reply.object_id)
        to_upload = set(store.preregister(0, get_object_tree(relay)))
        assert (to_upload & block_ids == set()) if held else (block_ids <= to_upload)
        if held:
            store.delete(reply.object_id)  # confirmed after the push: the relay message keeps the block
            assert all(store.get(i) for i in block_ids)
