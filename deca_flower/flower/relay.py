"""Relay blocks without moving them through the ServerApp: in deployment a block goes node ->
SuperLink -> neighbour; the ServerApp handles only its object ids.

Two parts, both only for Flower's HttpGrid (deployment); other grids (simulation, in-process
tests) pass messages in memory and are left as they are:

- Held confirmations. The grid confirms every reply as soon as it has pulled it, and the
  SuperLink then deletes the reply's objects. The ServerApp relays each half-step block to the
  node's neighbours in its next push, so without holding the confirmations until after that
  push the same block would be uploaded back to the SuperLink right after it was deleted there.
  Held, the SuperLink finds the block in its object store (same content, same object id) and
  Flower's push skips it.
- Replies pulled without their array chunks. Flower's pull downloads every object of a reply
  (81 MiB for a SmolLM2 block of 6 layers) and joins the chunks, only for the ServerApp to push
  the same objects back by id. `pull_replies` fetches the small objects (message, records,
  array headers) and gives each Array as a `RelayedArray`: its chunks stay on the SuperLink and
  its `data` is fetched on first read (the coordinator reads blocks once per visit, for the
  consensus-distance metric). A relay push then names the chunks by id; should the SuperLink
  no longer hold one, the push fails with `RelayError` instead of sending anything else.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Array, ArrayRecord, Error, Message, Metadata
from flwr.app.message.arraychunk import ArrayChunk
from flwr.common.constant import ErrorCode
from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import (
    InflatableObject,
    get_object_body,
    get_object_children_ids_from_object_content,
    get_object_type_from_object_content,
)
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    inflate_object_from_contents,
    pull_objects,
)
from flwr.superlink.grid.http_grid import HttpGrid

FetchObjects = Callable[[list[str]], dict[str, bytes]]
# looks for a reply's message object while its node still uploads the reply: after 0.02 s, then
# every 0.05 s; given up (an error reply) if the upload does not finish within UPLOAD_WAIT_S
UPLOAD_RETRY_S, UPLOAD_RETRY_CAP_S, UPLOAD_WAIT_S = 0.02, 0.05, 600.0


class RelayError(RuntimeError):
    """A block the ServerApp relays by id is no longer on the SuperLink."""


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
    elif client is not None and hasattr(client, "ConfirmMessageReceived"):
        grid._client = HeldConfirmations(client)  # type: ignore[attr-defined]


class RemoteChunk(InflatableObject):
    """An array chunk left on the SuperLink: known here by its object id only."""

    def __init__(self, object_id: str) -> None:
        self._id = object_id

    @property
    def object_id(self) -> str:
        return self._id

    def deflate(self) -> bytes:
        raise RelayError(f"the SuperLink asked for chunk {self._id} of a relayed block, which it no longer "
                         "holds (a reply confirmed before the push that relays it?)")


class RelayedArray(Array):
    """An Array whose chunks stay on the SuperLink; `data` is fetched (once) on first read."""

    @classmethod
    def from_content(cls, object_id: str, content: bytes, fetch: FetchObjects) -> RelayedArray:
        meta = json.loads(get_object_body(content, Array))
        chunk_ids = get_object_children_ids_from_object_content(content)
        array = object.__new__(cls)  # Array.__init__ would want the data
        array.__dict__.update(dtype=meta["dtype"], shape=tuple(meta["shape"]), stype=meta["stype"],
                              _content=content, _id=object_id, _fetch=fetch,
                              _chunks=[(chunk_ids[i], RemoteChunk(chunk_ids[i])) for i in meta["arraychunk_ids"]])
        return array

    @property
    def object_id(self) -> str:
        return self.__dict__["_id"]

    @property
    def is_dirty(self) -> bool:
        return False

    def deflate(self) -> bytes:
        return self.__dict__["_content"]

    @property
    def data(self) -> bytes:  # type: ignore[override]
        if "_data" not in self.__dict__:
            order = [chunk_id for chunk_id, _ in self.__dict__["_chunks"]]
            contents = self.__dict__["_fetch"](sorted(set(order)))
            self.__dict__["_data"] = b"".join(get_object_body(contents[i], ArrayChunk) for i in order)
        return self.__dict__["_data"]


def pull_replies(grid: Grid, message_ids: Iterable[str]) -> list[Message]:
    """The grid's replies to `message_ids`; from an HttpGrid with their arrays left on the SuperLink."""
    if not isinstance(grid, HttpGrid):
        return list(grid.pull_messages(message_ids))
    client, run_id = grid._runtime_client, grid.run.run_id  # noqa: SLF001 (Flower's client, as its pull uses it)
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
            built[name] = RelayedArray.from_content(array_id, contents[array_id], fetch)
        if built.object_id != record.object_id:  # Flower's record format changed under us: do not guess
            raise RelayError(f"ArrayRecord {record.object_id} rebuilt without its chunks has id {built.object_id}")
        prebuilt[record.object_id] = built
    return contents, prebuilt
