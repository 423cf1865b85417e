"""Test hook (tests/test_deployment.py), loaded only by processes that have this folder on
PYTHONPATH. In a deca_flower task runner:
- the first runner holds its Nth task between sending the reply and reporting the task done,
  writing its pid to DECA_TEST_HOLD_MARKER, so that the test can kill it exactly there;
- the runner started after that (the marker exists) holds its first reply for 75 s, so that the
  dead task's heartbeat expires (at most 60 s after the kill) while the node has a message open."""

import os

if os.environ.get("DECA_TEST_HOLD_MARKER") and b"deca_flower.flower.task_runner" in open("/proc/self/cmdline", "rb").read():
    import time

    from flwr.supernode.runtime import run_clientapp

    marker = os.environ["DECA_TEST_HOLD_MARKER"]
    restarted = os.path.exists(marker)
    push_message, push_task_output, tasks = run_clientapp.push_message, run_clientapp.push_task_output, [0]

    def held_push_message(*args, **kwargs):
        tasks[0] += 1
        if restarted and tasks[0] == 1:
            time.sleep(75)
        return push_message(*args, **kwargs)

    def held_push_task_output(*args, **kwargs):
        if not restarted and tasks[0] == int(os.environ["DECA_TEST_HOLD_AT_TASK"]):
            with open(marker, "w") as out:
                out.write(str(os.getpid()))
            time.sleep(300)
        return push_task_output(*args, **kwargs)

    run_clientapp.push_message, run_clientapp.push_task_output = held_push_message, held_push_task_output
