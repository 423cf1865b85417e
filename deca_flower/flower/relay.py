"""Relay without re-uploading: the SuperLink keeps a pulled reply until the blocks in it are relayed.

In deployment the ServerApp's grid confirms every reply as soon as it has pulled it, and the
SuperLink then deletes the reply's objects. The ServerApp relays each half-step block to the
node's neighbours in its next push, so without this the same block is uploaded back to the
SuperLink (81 MiB per SmolLM2 block of 6 layers) right after it was deleted there. Holding the
confirmations until after that push lets the SuperLink find the block in its object store (same
content, same object id), and Flower's push skips objects the SuperLink already has.

Only for Flower's HttpGrid (deployment: a `_client` with `ConfirmMessageReceived`); other grids
(simulation, in-process tests) pass messages in memory and are left as they are.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp import Grid


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
