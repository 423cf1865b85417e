"""Test hook (tests/test_deployment.py), loaded only by processes that have this folder on
PYTHONPATH: a deca_flower task runner holds its Nth task between sending the reply and reporting
the task done (writing its pid to DECA_TEST_HOLD_MARKER), so that a test can kill it exactly there."""

import os

if os.environ.get("DECA_TEST_HOLD_MARKER") and b"deca_flower.flower.task_runner" in open("/proc/self/cmdline", "rb").read():
    import time

    from flwr.supernode.runtime import run_clientapp

    _push_task_output, _tasks = run_clientapp.push_task_output, [0]

    def _held_push_task_output(*args, **kwargs):
        _tasks[0] += 1
        marker = os.environ["DECA_TEST_HOLD_MARKER"]
        if _tasks[0] == int(os.environ["DECA_TEST_HOLD_AT_TASK"]) and not os.path.exists(marker):
            with open(marker, "w") as out:
                out.write(str(os.getpid()))
            time.sleep(300)
        return _push_task_output(*args, **kwargs)

    run_clientapp.push_task_output = _held_push_task_output
