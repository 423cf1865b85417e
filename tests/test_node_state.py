"""Node state survives a process that has no warm copy (another Ray actor, a restart)."""

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from deca_flower.flower import state
from deca_flower.flower.transport import CoordinationError
from tests.test_bad_input import started_coordinator, warm_runtime


def run_steps(cfg, tmp_path, drop_warm_after: set[int]):
    coordinator, grid = started_coordinator(cfg, tmp_path)
    # (block, start, finish): visits end with a mix-only message or ride on the next visit's first step
    plan = [(1, True, None), (1, False, None), (1, False, None), (None, False, 0), (2, True, None), (2, False, None),
            (None, False, 1), (0, True, None), (0, False, None), (1, True, 2), (None, False, 3)]
    for i, (block, start, finish) in enumerate(plan):
        coordinator.exchange(block=block, start=start, finish=finish)
        if i in drop_warm_after:
            _forget_this_process()  # as if the next message landed in a fresh process
    return [warm_runtime(coordinator, grid, p).node.model for p in range(cfg.num_nodes)]


@pytest.mark.parametrize("compression", ["none", "int4"])
def test_step_sync_restores_mid_block_state_exactly(tiny_cfg, tmp_path, compression):
    # the irregular 4-node graph; compressed: the public copies are restored with the block
    cfg = tiny_cfg.replace(state_sync="step", bma="trivial", compression=compression)
    warm = run_steps(cfg.replace(state_dir=str(tmp_path / "a")), tmp_path, set())
    cold = run_steps(cfg.replace(state_dir=str(tmp_path / "b")), tmp_path, {0, 1, 3, 4, 5, 7, 9})
    for a, b in zip(warm, cold):
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(pa, pb), name


def test_block_sync_refuses_a_mid_block_restart_clearly(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(state_sync="block")
    with pytest.raises(CoordinationError, match=r"StateLost: node \d: state at generation \d+ is not in this process"
                                                r".*need state-sync='step'"):
        run_steps(cfg, tmp_path, {1})
    # after a mix-only message (evaluation points, the end) nothing is pending: a restart is fine
    run_steps(cfg.replace(state_dir=str(tmp_path / "c")), tmp_path, {3, 6})


def _context(generation: int, cfg) -> Context:
    """A node's Flower context after a Setup with `cfg` and `generation` messages."""
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    state.configure(context, cfg.to_run_config())
    if generation:
        context.state[state.STATE_RECORD] = ConfigRecord({"generation": generation})
    return context


def _forget_this_process():
    state._WARM.clear()
    state._CONFIGS.clear()


def test_a_process_that_died_before_its_reply_is_restored_from_its_newer_disk_state(tiny_cfg, tmp_path):
    """The node saved its state after a message, then died before the reply (which carries the
    updated context) left: its SuperNode still holds the context of one message earlier."""
    _forget_this_process()
    cfg = tiny_cfg.replace(state_sync="step", state_dir=str(tmp_path / "nodes"))
    runtime = state.get_runtime(_context(0, cfg), 0)
    runtime.node.start_block(1)
    for generation in range(3):
        runtime.node.local_step()
        state.commit(_context(generation, cfg), runtime)  # on disk: generation + 1
    saved = {name: p.detach().clone() for name, p in runtime.node.model.named_parameters()}
    _forget_this_process()
    restored = state.get_runtime(_context(2, cfg), 0)  # the reply of message 3 was lost
    assert restored.generation == 3
    for name, p in restored.node.model.named_parameters():
        assert torch.equal(p, saved[name]), name
    _forget_this_process()
    with pytest.raises(state.StateLost, match="on disk: 3"):  # two behind: not a lost reply
        state.get_runtime(_context(1, cfg), 0)


def test_a_message_whose_effects_are_on_disk_is_not_applied_twice(tiny_cfg, tmp_path):
    """The process committed message "m3" and died before replying; should the same message reach a
    fresh process, it must refuse it instead of stepping again."""
    _forget_this_process()
    cfg = tiny_cfg.replace(state_sync="step", state_dir=str(tmp_path / "nodes"))
    runtime = state.get_runtime(_context(0, cfg), 0)
    runtime.node.start_block(1)
    for generation in range(3):
        runtime.node.local_step()
        state.commit(_context(generation, cfg), runtime, f"m{generation + 1}")
    _forget_this_process()
    with pytest.raises(state.StateLost, match="message m3 was already handled"):
        state.get_runtime(_context(2, cfg), 0, message_id="m3")
    assert state.get_runtime(_context(2, cfg), 0, message_id="m4").generation == 3  # a new message goes on


def test_a_crash_between_the_block_and_the_position_leaves_the_older_pair_whole(tiny_cfg, tmp_path, monkeypatch):
    _forget_this_process()
    cfg = tiny_cfg.replace(state_sync="step", state_dir=str(tmp_path / "nodes"))
    runtime = state.get_runtime(_context(0, cfg), 0)
    runtime.node.start_block(1)
    runtime.node.local_step()
    state.commit(_context(0, cfg), runtime)
    saved = {name: p.detach().clone() for name, p in runtime.node.model.named_parameters()}
    runtime.node.local_step()

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed after writing the active block, before position.json")

    monkeypatch.setattr(state.json, "dumps", die)
    with pytest.raises(KeyboardInterrupt):
        state.commit(_context(1, cfg), runtime)
    monkeypatch.undo()
    _forget_this_process()
    restored = state.get_runtime(_context(1, cfg), 0)
    assert restored.generation == 1
    for name, p in restored.node.model.named_parameters():
        assert torch.equal(p, saved[name]), name
