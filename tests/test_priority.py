"""A node's process takes back its parent's CPU priority (Ray starts actors at niceness 15)."""

import logging
import os
import subprocess
import sys

import pytest

from deca_flower.flower import priority

CHILD = """
import os, threading, time
os.setpriority(os.PRIO_PROCESS, 0, 12)                        # as Ray's core worker does
threading.Thread(target=time.sleep, args=(2,), daemon=True).start()  # a thread that inherits 12
from deca_flower.flower.priority import match_parent_priority
match_parent_priority()
print(sorted({os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")}))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or os.geteuid() != 0,
                    reason="lowering niceness needs Linux and CAP_SYS_NICE (root here and in CI)")
def test_every_thread_gets_the_parents_niceness_back():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"[{os.getpriority(os.PRIO_PROCESS, 0)}]"


def test_without_permission_it_says_how_to_start_ray(monkeypatch, caplog):
    monkeypatch.setattr(priority, "_niceness", lambda thread: 15)

    def refused(*args):
        raise PermissionError("not permitted")

    monkeypatch.setattr(priority.os, "setpriority", refused)
    with caplog.at_level(logging.WARNING):
        priority.match_parent_priority()
    assert "niceness 15" in caplog.text and "RAY_worker_niceness=" in caplog.text
