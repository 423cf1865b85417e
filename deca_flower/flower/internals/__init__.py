"""The one door to Flower's non-public API: no deca_flower module outside this package imports
past flwr.app, flwr.clientapp, flwr.serverapp, flwr.simulation and flwr_datasets
(tests/test_layers.py walks the imports to check).

Two fast paths need it, each worth seconds per inner step in deployment (bench/engine_overhead.py):
- relay by id (relay.py, ServerApp): reply confirmations held until the push that relays their
  blocks, replies pulled without their array chunks (which stay on the SuperLink), and a reply
  still uploading waited for with short looks instead of Flower's 1 s retry;
- a warm node (supernode.py, `deca-flower-supernode`): Flower's SuperNode with the naps of its
  polling loop capped, and its ClientApp tasks run in a thread of the SuperNode process on a
  ClientApp loaded once, each Runtime API call answered by Flower's SuperNode handler directly.

Read from and tested on Flower >= 1.41.0, < 1.43 (TESTED). On any other Flower `fast_paths()`
says once which versions are supported and what is off, and Flower's plain path runs instead: its
own pull, its own SuperNode with a `flwr-clientapp` process per message. The private modules are
imported only after that check passed, by relay.py and supernode.py, so a Flower that has moved
them still runs the plain path.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

TESTED = ((1, 41, 0), (1, 43))  # Flower versions [from, to) the fast paths were read from and tested on
TESTED_TEXT = f"flwr >= {'.'.join(map(str, TESTED[0]))}, < {'.'.join(map(str, TESTED[1]))}"


@functools.cache
def fast_paths() -> bool:
    """Whether the installed Flower is one the fast paths were tested on (checked once per process)."""
    version = importlib.metadata.version("flwr")
    if TESTED[0] <= tuple(int(part) for part in re.findall(r"\d+", version)[:3]) < TESTED[1]:
        return True
    log.warning("Flower %s: deca_flower's fast paths are tested on %s only. Off: relaying blocks by id on the "
                "ServerApp, and in deca-flower-supernode the capped polls and the warm in-SuperNode ClientApp. "
                "Flower's plain path runs instead (slower: a flwr-clientapp process per message).", version, TESTED_TEXT)
    return False


# -- what the rest of deca_flower calls: a fast path when tested, else Flower's plain one -------

def parse_run_config(text: str) -> dict[str, Any]:
    """`--run-config "k=v k2='s'"` read by Flower's own parser (as `flwr run` reads it); raises
    click.ClickException with Flower's message. Needed on any Flower version: not a fast path."""
    from flwr.common.config import parse_config_args

    return parse_config_args([text]) if text else {}


def confirm_after_push(grid: Grid) -> None:
    """Call right after every push to `grid` (ServerApp): see relay.confirm_after_push."""
    if fast_paths():
        from deca_flower.flower.internals import relay

        relay.confirm_after_push(grid)


def stop_holding_confirmations(grid: Grid) -> None:
    """Confirm the held replies and let the grid confirm as Flower does (before a Flower strategy
    pushes and pulls on it: nothing would release what it holds)."""
    if fast_paths():
        from deca_flower.flower.internals import relay

        relay.stop_holding(grid)


def pull_replies(grid: Grid, message_ids: Iterable[str]) -> list[Message]:
    """The grid's replies to `message_ids` (those in yet); relayed by id where the fast path applies."""
    if fast_paths():
        from deca_flower.flower.internals import relay

        return relay.pull_replies(grid, message_ids)
    return list(grid.pull_messages(message_ids))


def replies_in_memory(grid: Grid) -> bool:
    """Whether replies arrive in this process's memory (simulation), where a short look costs little."""
    if fast_paths():
        from deca_flower.flower.internals import relay

        return relay.in_memory(grid)
    return False


def content_wire_bytes(content: RecordDict) -> int | None:
    """Bytes Flower uploads in deployment for a message's content: each distinct object in it (the
    record dict, its records, arrays and array chunks) deflated once, as the SuperLink's object
    store keeps them. None on an untested Flower (the object layout is not public API)."""
    if not fast_paths():
        return None
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def run_supernode(flower_args: list[str], poll_interval_s: float) -> None:
    """Flower's `flower-supernode` with these arguments; with the fast paths its polls capped at
    `poll_interval_s` and its ClientApp warm in this process (supernode.py)."""
    if not fast_paths():  # this process becomes Flower's own SuperNode, from this environment if it has one
        beside = Path(sys.executable).parent / "flower-supernode"
        program = str(beside) if beside.is_file() else "flower-supernode"
        os.execvp(program, ["flower-supernode", *flower_args])
    from deca_flower.flower.internals import supernode

    supernode.run(flower_args, poll_interval_s)
