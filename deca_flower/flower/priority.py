"""A node's process takes back the CPU priority of the process that started it.

Ray starts its workers, the simulation engine's ClientApp actors among them, at niceness 15
(`RAY_worker_niceness`, ray-project/ray#24928) so that they yield the CPU to Ray's own daemons.
In a simulation the node's training is the work: at 15, every wake-up of Ray's and Flower's
threads (~800 per second here) preempts it, and with two torch threads on two cores one
preempted thread stalls the other at the next barrier (bench/RESULTS.md, session 10). Lowering
niceness needs CAP_SYS_NICE or a high enough RLIMIT_NICE; without them the node says how to
start Ray at niceness 0 instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def match_parent_priority() -> None:
    """Give every thread of this process its parent's niceness if it runs at a lower priority."""
    parent = os.getpriority(os.PRIO_PROCESS, os.getppid())
    tasks = Path("/proc/self/task")  # Linux: niceness is per thread
    threads = [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]
    before = {t: n for t in threads if (n := _niceness(t)) is not None and n > parent}
    if not before:
        return
    try:
        for thread in before:
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.setpriority(os.PRIO_PROCESS, thread, parent)
    except PermissionError:
        log.warning("this node's process runs at niceness %d, its parent at %d, and may not change that: "
                    "training yields the CPU to every other thread. For the simulation engine, start the "
                    "SuperLink with RAY_worker_niceness=%d in its environment", max(before.values()), parent, parent)
        return
    log.info("process %d: niceness %d -> %d (its parent's) for %d threads", os.getpid(), max(before.values()),
             parent, len(before))


def _niceness(thread: int) -> int | None:
    try:
        return os.getpriority(os.PRIO_PROCESS, thread)
    except ProcessLookupError:
        return None
