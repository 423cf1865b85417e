"""Relay by id (ServerApp, deployment): a block goes node -> SuperLink -> neighbour; the ServerApp
handles only its object ids. Flower's HttpGrid only; other grids pass messages in memory.

- Held confirmations. The grid confirms every reply as soon as it has pulled it, and the SuperLink
  then deletes the reply's objects. The ServerApp relays each half-step block to the node's
  neighbours in its next push, so without holding the confirmations until after that push the
  same block would be uploaded back to the SuperLink right after it was deleted there. Held, the
  SuperLink still has the block (same content, same object id) and Flower's push skips it.
- Replies pulled without their array chunks. Flower's pull downloads every object of a reply
  (81 MiB for a SmolLM2 block of 6 layers) and joins the chunks, only for the ServerApp to push
  the same objects back by id. `pull_replies` fetches the small objects (message, records, array
  headers) and gives each Array as a `RelayedArray`: its chunks stay on the SuperLink and its
  `data` is fetched on first read (the coordinator reads blocks once per visit, for the consensus
  distance). A relay push names the chunks by id; should the SuperLink no longer hold one, the
  push fails with RelayError instead of sending anything else.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Array, ArrayRecord, Error, Message, Metadata
from flwr.app.message.arraychunk import ArrayChunk
from flwr.common.constant import ErrorCode
from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest
from flwr.proto.runtime_pb2 import PullAppMessagesRequest
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import (
    InflatableObject,
    get_object_body,
    get_object_children_ids_from_object_content,
    get_object_type_from_object_content,
)
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, inflate_object_from_contents, pull_objects
from flwr.superlink.grid import InMemoryGrid
from flwr.superlink.grid.http_grid import HttpGrid

FetchObjects = Callable[[list[str]], dict[str, bytes]]
# looks for a reply's message object while its node still uploads the reply: after 0.02 s, then
# every 0.05 s; given up (an error reply) if the upload does not finish within UPLOAD_WAIT_S
UPLOAD_RETRY_S, UPLOAD_RETRY_CAP_S, UPLOAD_WAIT_S = 0.02, 0.05, 600.0


class RelayError(RuntimeError):
    """A block the ServerApp relays by id is no longer on the SuperLink."""


def in_memory(grid: Grid) -> bool:
    return isinstance(grid, InMemoryGrid)


class HeldConfirmations:
    """Stands in for the grid's Runtime API client; holds reply confirmations until `release`."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.held: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def ConfirmMessageReceived(self, request: Any) -> None:  # noqa: N802 (Flower's RPC name)
        self.held.append(request)

    def release(self) -> None:
        held, self.held = self.held, []
        for request in held:
            self.client.ConfirmMessageReceived(request)


def confirm_after_push(grid: Grid) -> None:
    """Call right after every push: confirms the replies pulled before it (the pushed messages
    now reference their blocks) and holds the confirmations of replies pulled from now on. Held
    ones left at the end go with Flower's clean-up of the run."""
    client = getattr(grid, "_client", None)
    if isinstance(client, HeldConfirmations):
        client.release()
    elif isinstance(grid, HttpGrid) and client is not None:
        grid._client = HeldConfirmations(client)


def stop_holding(grid: Grid) -> None:
    client = getattr(grid, "_client", None)
    if isinstance(client, HeldConfirmations):
        client.release()
        grid._client = client.client


class RemoteChunk(InflatableObject):
    """An array chunk left on the SuperLink: known here by its object id only."""

    def __init__(self, object_id: str) -> None:
        self.remote_id = object_id

    @property
    def object_id(self) -> str:
        return self.remote_id

    def deflate(self) -> bytes:
        raise RelayError(f"the SuperLink asked for chunk {self.remote_id} of a relayed block, which it no longer "
                         "holds (a reply confirmed before the push that relays it?)")


class RelayedArray(Array):
    """An Array whose chunks stay on the SuperLink; `data` is fetched (once) on first read."""

    def __init__(self, object_id: str, content: bytes, fetch: FetchObjects) -> None:
        meta = json.loads(get_object_body(content, Array))
        super().__init__(dtype=meta["dtype"], shape=tuple(meta["shape"]), stype=meta["stype"], data=b"")
        chunk_ids = get_object_children_ids_from_object_content(content)
        # Array.slice_array and children read the chunks from "_chunks"; they are only named here
        self.__dict__.update(relayed_id=object_id, relayed_content=content, fetch=fetch, fetched=None,
                             _chunks=[(chunk_ids[i], RemoteChunk(chunk_ids[i])) for i in meta["arraychunk_ids"]])

    @property
    def object_id(self) -> str:
        return self.__dict__["relayed_id"]

    @property
    def is_dirty(self) -> bool:
        return False

    @is_dirty.setter
    def is_dirty(self, value: bool) -> None:
        pass  # its content is the SuperLink's

    def deflate(self) -> bytes:
        return self.__dict__["relayed_content"]

    @property
    def data(self) -> bytes:  # type: ignore[override]
        if self.__dict__.get("fetched") is None:
            order = [chunk_id for chunk_id, _ in self.__dict__["_chunks"]]
            contents = self.__dict__["fetch"](sorted(set(order)))
            self.__dict__["fetched"] = b"".join(get_object_body(contents[i], ArrayChunk) for i in order)
        return self.__dict__["fetched"]

    @data.setter
    def data(self, value: bytes) -> None:
        pass  # Array.__init__ sets it; the bytes stay on the SuperLink until read


def pull_replies(grid: Grid, message_ids: Iterable[str]) -> list[Message]:
    """The grid's replies to `message_ids`; from an HttpGrid with their arrays left on the SuperLink."""
    if not isinstance(grid, HttpGrid):
        return list(grid.pull_messages(message_ids))
    client, run_id = grid._runtime_client, grid.run.run_id
    pull_one = make_pull_object_fn_protobuf(pull_object_protobuf=client.PullObject, node=grid.node, run_id=run_id)

    def fetch(object_ids: list[str]) -> dict[str, bytes]:
        try:  # a reply's chunks were all uploaded before its message object: one missing now is gone
            return pull_objects(object_ids, pull_one, max_tries_per_object=1)
        except ObjectPullError as err:
            raise RelayError(f"a relayed block is no longer on the SuperLink: {err}") from err

    response = client.PullMessages(PullAppMessagesRequest(message_ids=list(message_ids)))
    replies = []
    for proto, tree in zip(response.messages_list, response.message_object_trees, strict=True):
        message_id = proto.metadata.message_id
        try:
            contents, prebuilt = _pull_without_chunks(tree, fetch, pull_one)
        except ObjectPullError as err:  # as Flower's pull: the reply becomes an error reply
            replies.append(Message(metadata=Metadata(
                run_id=run_id, message_id="", src_node_id=proto.metadata.src_node_id, dst_node_id=grid.node.node_id,
                message_type=proto.metadata.message_type, group_id="", ttl=0,
                reply_to_message_id=proto.metadata.reply_to_message_id, created_at=proto.metadata.created_at),
                error=Error(ErrorCode.MESSAGE_UNAVAILABLE, f"reply objects unavailable: {err}")))
            continue
        client.ConfirmMessageReceived(ConfirmMessageReceivedRequest(node=grid.node, run_id=run_id,
                                                                    message_object_id=message_id))
        message = inflate_object_from_contents(message_id, contents, objects=prebuilt)
        message.metadata.__dict__["_message_id"] = message_id
        replies.append(message)
    return replies


def _pull_without_chunks(tree: Any, fetch: FetchObjects, pull_one: Callable[[str], bytes]
                         ) -> tuple[dict[str, bytes], dict[str, InflatableObject]]:
    """Contents of every object in a message tree except array chunks, and each ArrayRecord
    prebuilt from RelayedArrays (the levels: message, record dict, records, arrays, chunks)."""
    records = [record for content in tree.children for record in content.children]
    arrays = [array for record in records for array in record.children]
    # A node sends its reply's objects after the reply, the message object last (post-order), so the
    # message can be listed while its objects are still arriving. Flower's pull retries each missing
    # one after 1 s, which put a ~1 s pause into every inner step: wait for the message object with
    # short retries instead; once it is here, so is everything below it.
    contents = pull_objects([tree.object_id], pull_one, initial_backoff=UPLOAD_RETRY_S, backoff_cap=UPLOAD_RETRY_CAP_S,
                            max_time=UPLOAD_WAIT_S, max_tries_per_object=None)  # Flower's 500 tries: ~25 s
    contents |= pull_objects([node.object_id for node in [*tree.children, *records, *arrays]], pull_one)
    prebuilt: dict[str, InflatableObject] = {}
    for record in records:
        if get_object_type_from_object_content(contents[record.object_id]) != ArrayRecord.__qualname__:
            continue
        names = json.loads(get_object_body(contents[record.object_id], ArrayRecord))
        built = ArrayRecord()
        for name, array_id in names.items():
            if get_object_type_from_object_content(contents[array_id]) != Array.__qualname__:
                raise ObjectPullError(array_id, "an ArrayRecord entry is not an Array")
            built[name] = RelayedArray(array_id, contents[array_id], fetch)
        if built.object_id != record.object_id:  # Flower's record format changed under us: do not guess
            raise RelayError(f"ArrayRecord {record.object_id} rebuilt without its chunks has id {built.object_id}")
        prebuilt[record.object_id] = built
    return contents, prebuilt
