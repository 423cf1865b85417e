"""ServerApp side: requests to nodes and their replies. Push, then pull every PULL_INTERVAL_S
until every reply is in or the timeout passed (Flower's Grid.send_and_receive pauses 3 s between
pulls: 1.5 s per inner step on average); blocks are relayed by id where Flower's internals allow
(flower/internals/relay.py)."""

from __future__ import annotations

import time

from flwr.app import Message
from flwr.serverapp import Grid

from deca_flower.flower import internals
from deca_flower.protocol.messages import Payload, request

# the simulation's LAST reply is looked for every 0.02 s (the step ends with it); short looks all
# the time cost as much CPU as they saved
PULL_INTERVAL_S = 0.1
LAST_REPLY_PULL_INTERVAL_S = 0.02


class CoordinationError(RuntimeError):
    """Nodes missing, duplicated partitions, a refused message, or a node answered with an error."""


class Transport:
    """Sends typed requests to nodes of a Flower grid and collects their replies.

    Parameters
    ----------
    grid : Grid
        Flower's message grid (simulation, deployment, or a test's in-process grid).
    reply_timeout_s : float
        How long to wait for the replies to one round of requests.
    """

    def __init__(self, grid: Grid, reply_timeout_s: float) -> None:
        self.grid = grid
        self.reply_timeout_s = reply_timeout_s

    def node_ids(self) -> list[int]:
        return sorted(self.grid.get_node_ids())

    def send(self, requests: dict[int, Payload], timeout: float | None = None) -> dict[int, Message]:
        """Each node's reply (error replies included), keyed by the node the request went to; nodes
        that did not answer within `timeout` (default reply_timeout_s) are left out."""
        if not requests:  # no push: replies pulled before stay held for the next one
            return {}
        messages = [request(node_id, payload) for node_id, payload in requests.items()]
        pushed = list(self.grid.push_messages(messages))
        if len(pushed) != len(messages) or None in pushed:  # HttpGrid: [] on HTTP 413, None for a refused message
            refused = len(messages) - len([i for i in pushed if i is not None])
            raise CoordinationError(f"the SuperLink refused {refused} of {len(messages)} messages "
                                    "(payload too large or malformed: see Flower's log above)")
        internals.confirm_after_push(self.grid)
        # a reply belongs to the node its request went to: the SuperLink's own error replies ("node
        # unavailable" after a SuperNode died) carry the SuperLink's node id as their source
        sent_to = dict(zip(pushed, requests))
        deadline = time.monotonic() + (self.reply_timeout_s if timeout is None else timeout)
        in_memory = internals.replies_in_memory(self.grid)
        replies: dict[int, Message] = {}
        while len(replies) < len(sent_to):
            pending = [message_id for message_id, node_id in sent_to.items() if node_id not in replies]
            for reply in internals.pull_replies(self.grid, pending):
                replies[sent_to[reply.metadata.reply_to_message_id]] = reply
            if len(replies) < len(sent_to) and time.monotonic() < deadline:
                time.sleep(LAST_REPLY_PULL_INTERVAL_S if in_memory and len(sent_to) - len(replies) == 1
                           else PULL_INTERVAL_S)
            elif len(replies) < len(sent_to):
                break
        return replies
