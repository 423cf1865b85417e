"""deca-flower-supernode: Flower's SuperNode with its polling sleeps capped (the loopback tests run it for real)."""

import time
import types
from pathlib import Path

import pytest

from deca_flower.flower.supernode import cap_polling_sleeps, main


def test_sleeps_are_capped_and_the_rest_of_time_is_untouched():
    loop = types.ModuleType("loop")
    loop.time = time
    assert cap_polling_sleeps(loop, 0.01)
    start = time.monotonic()
    loop.time.sleep(3)
    assert time.monotonic() - start < 1.0
    assert loop.time.monotonic() >= start and loop.time.time() == pytest.approx(time.time(), abs=1.0)


def test_a_loop_that_does_not_use_the_time_module_is_left_alone():
    loop = types.ModuleType("loop")
    loop.time = object()
    before = loop.time
    assert not cap_polling_sleeps(loop, 0.01)
    assert loop.time is before


def test_the_pinned_flower_polls_with_time_sleep_in_the_patched_module():
    from flwr.supernode import start_client_internal

    assert start_client_internal.time is time
    source = Path(start_client_internal.__file__).read_text()
    assert "time.sleep(3)" in source  # the idle wait this command shortens


def test_a_bad_poll_interval_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--poll-interval-s", "0", "--insecure"])
    assert exit_info.value.code == 2
    assert "--poll-interval-s must be > 0" in capsys.readouterr().err
