"""Bad input gets a clear error that names what is wrong; nothing bad enters a model."""

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from apps.client_app import app as client_app
from deca_flower.data.sources import DataError
from deca_flower.flower import records as rk
from deca_flower.flower import state
from deca_flower.flower.coordinator import CoordinationError, Coordinator
from deca_flower.flower.job import run_deca
from deca_flower.paths import prepare_run
from deca_flower.results import RunWriter
from deca_flower.runtime import build_runtime, node_data
from tests.inprocess import InProcessGrid


def started_coordinator(cfg, tmp_path, **grid_args):
    state._WARM.clear()
    cfg, run_dir = prepare_run(cfg)
    grid = InProcessGrid(client_app, cfg.num_nodes, **grid_args)
    coordinator = Coordinator(grid, cfg, RunWriter(run_dir))
    coordinator.query_nodes(coordinator.wait_for_nodes())
    return coordinator, grid


def train_message(coordinator, pid, neighbour_blocks):
    content = RecordDict({rk.CONFIG: coordinator.config_record,
                          rk.INSTRUCTION: ConfigRecord({rk.STEP: 1, rk.MIX: True, rk.BLOCK: 1, rk.START: False,
                                                       rk.FINISH: -1})})
    mixing = {"self": 1.0 - 0.5 * len(neighbour_blocks)}
    for j, block in neighbour_blocks.items():
        content[f"{rk.NEIGHBOUR_PREFIX}{j}"] = rk.block_to_record(block)
        mixing[f"{rk.NEIGHBOUR_PREFIX}{j}"] = 0.5
    content[rk.WEIGHTS] = ConfigRecord(mixing)
    return Message(content, dst_node_id=coordinator.node_of[pid], message_type=rk.TRAIN)


@pytest.mark.parametrize(("corrupt", "message"), [
    (lambda b: {k: v.fill_(math.nan) for k, v in b.items()}, "NaN or Inf"),
    (lambda b: {k: v.reshape(-1) for k, v in b.items()}, "shape"),
    (lambda b: {k: v.half() for k, v in b.items()}, "dtype"),
    (lambda b: dict(list(b.items())[1:]), "missing"),
])
def test_bad_neighbour_block_is_refused_by_the_mod(tiny_cfg, tmp_path, corrupt, message):
    cfg = tiny_cfg.replace(num_nodes=3, topology="complete")
    coordinator, grid = started_coordinator(cfg, tmp_path)
    weights = np.full((3, 3), 1 / 3)
    coordinator.exchange(weights, block=1, start=True)
    runtime = state._WARM[(grid.run_id, coordinator.node_of[0])]
    before = {k: v.clone() for k, v in runtime.node.block_values().items()}
    good = {k: v.clone() for k, v in before.items()}
    bad = corrupt({k: v.clone() for k, v in before.items()})
    [reply] = grid.send_and_receive([train_message(coordinator, 0, {1: good, 2: bad})])
    assert reply.has_error() and message in reply.error.reason and "node 2" in reply.error.reason
    for name, value in runtime.node.block_values().items():  # nothing was mixed in
        assert torch.equal(value, before[name])


def test_coordinator_stops_with_the_node_named_on_an_error_reply(tiny_cfg, tmp_path):
    coordinator, grid = started_coordinator(tiny_cfg.replace(num_nodes=3, topology="complete"), tmp_path)
    weights = np.full((3, 3), 1 / 3)
    coordinator.exchange(weights, block=1, start=True)
    halves = coordinator.progress.halves
    halves[2] = rk.block_to_record({k: torch.full_like(v, math.inf)
                                    for k, v in rk.record_to_block(halves[2], "t").items()})
    with pytest.raises(CoordinationError, match="NaN or Inf"):
        coordinator.exchange(weights, block=1, start=False)


def test_missing_nodes_and_missing_replies_are_reported(tiny_cfg, tmp_path):
    cfg, run_dir = prepare_run(tiny_cfg.replace(num_nodes=3, node_wait_s=1))
    with pytest.raises(CoordinationError, match=r"only 2 of 3 SuperNodes \(num-nodes=3\)"):
        run_deca(InProcessGrid(client_app, 2), cfg, run_dir)
    coordinator, grid = started_coordinator(tiny_cfg.replace(num_nodes=3), tmp_path)
    grid.drop_replies_from = {coordinator.node_of[1]}
    with pytest.raises(CoordinationError, match="1 of 3 nodes did not reply"):
        coordinator.exchange(np.full((3, 3), 1 / 3), block=0, start=True)


def test_node_without_partition_id_is_refused(tiny_cfg, tmp_path):
    with pytest.raises(Exception, match="partition-id"):
        started_coordinator(tiny_cfg, tmp_path, node_configs={0: {}, 1: {"partition-id": 1}, 2: {"partition-id": 2}})


def test_more_nodes_than_data_or_graph_allows(tiny_cfg):
    from deca_flower.core.topology import TopologyError, build_graph

    with pytest.raises(TopologyError, match="rows, cols >= 3"):
        build_graph("torus", 5)
    with pytest.raises(DataError, match="nodes but only"):
        build_runtime(tiny_cfg.replace(num_nodes=5000), 0)
    with pytest.raises(ValueError, match="exceeds the model's 4 layers"):
        build_runtime(tiny_cfg.replace(layers_per_block=8), 0)
    with pytest.raises(DataError, match="lower shards-per-node"):
        build_runtime(tiny_cfg.replace(partitioner="shard", shards_per_node=1000), 0)
    # 1,700 training articles, but not 10 each for 50 nodes drawn from Dirichlet(0.25) over 5 topics
    with pytest.raises(DataError, match="the dirichlet split \\(alpha=0.25\\) found no way to give each of 50 nodes "
                                        "at least 10 of the 1700 training examples: use fewer nodes, a larger alpha"):
        node_data(tiny_cfg.replace(num_nodes=50, topology="complete"), 0)


def test_exclude_mode_drops_the_bad_neighbour_renormalises_and_goes_on(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(num_nodes=3, topology="complete", on_bad_block="exclude", max_block_deviation=0.0)
    coordinator, grid = started_coordinator(cfg, tmp_path)
    coordinator.exchange(np.full((3, 3), 1 / 3), block=1, start=True)
    runtime = state._WARM[(grid.run_id, coordinator.node_of[0])]
    own = {k: v.clone() for k, v in runtime.node.block_values().items()}
    good = {k: v + 1.0 for k, v in own.items()}
    bad = {k: torch.full_like(v, math.nan) for k, v in own.items()}
    [reply] = grid.send_and_receive([train_message(coordinator, 0, {1: good, 2: bad})])
    assert not reply.has_error()
    assert "node 2" in reply.content[rk.EXCLUDED]["senders"][0] and reply.content[rk.METRICS]["excluded"] == 1
    # self weight 0 + the excluded 0.5 -> mixed = 0.5 * own + 0.5 * (own + 1); then one Adam step (lr 1e-3)
    mixed_then_stepped = runtime.node.block_values()
    for name, value in own.items():
        torch.testing.assert_close(mixed_then_stepped[name], value + 0.5, atol=2e-3, rtol=0)


def test_absurdly_far_block_is_refused(tiny_cfg, tmp_path):
    coordinator, grid = started_coordinator(tiny_cfg.replace(num_nodes=3, topology="complete"), tmp_path)
    coordinator.exchange(np.full((3, 3), 1 / 3), block=1, start=True)
    own = state._WARM[(grid.run_id, coordinator.node_of[0])].node.block_values()
    far = {k: v * 100.0 for k, v in own.items()}
    [reply] = grid.send_and_receive([train_message(coordinator, 0, {1: far})])
    assert reply.has_error() and "max-block-deviation" in reply.error.reason



def test_a_half_that_does_not_decode_or_match_is_left_out_of_the_consensus_distance(tiny_cfg, tmp_path, caplog):
    # on-bad-block=exclude: the nodes left such a half out and went on; the relay's metric must too
    coordinator, _ = started_coordinator(tiny_cfg.replace(num_nodes=3, topology="complete"), tmp_path)
    coordinator.exchange(np.full((3, 3), 1 / 3), block=1, start=True)
    halves = coordinator.progress.halves
    x0, x2 = (rk.record_to_block(halves[pid], "t") for pid in (0, 2))
    halves[1] = rk.block_to_record({k: v.reshape(-1) for k, v in rk.record_to_block(halves[1], "t").items()})
    with caplog.at_level("WARNING"):
        distance = coordinator._consensus_distance()
    # two nodes left: each is half their difference away from the mean
    assert distance == pytest.approx(sum(float(((x0[k] - x2[k]) ** 2).sum()) for k in x0) / 4)
    assert "node 1's half has other tensors" in caplog.text
    halves[2] = rk.block_to_record({"w": torch.zeros(2)})
    halves[2]["block"].data = bytes(halves[2]["block"].data)[:-4]  # truncated
    with caplog.at_level("WARNING"):
        assert coordinator._consensus_distance() == 0.0  # node 0 alone
    assert "block from node 2" in caplog.text and "its manifest describes" in caplog.text


@pytest.mark.parametrize("pushed", [[], ["id-1", None]], ids=["HTTP 413", "one refused"])
def test_messages_the_superlink_refuses_stop_the_exchange(pushed, monkeypatch):
    from types import SimpleNamespace

    from flwr.supercore.task_identity import TaskIdentity

    from deca_flower.flower.coordinator import send_and_receive

    for name in ("_run_id", "_node_id", "_task_id"):  # as in a ServerApp process
        monkeypatch.setattr(TaskIdentity, name, 7)
    grid = SimpleNamespace(push_messages=lambda messages: pushed)
    messages = [Message(RecordDict(), dst_node_id=n, message_type=rk.QUERY) for n in (1, 2)]
    with pytest.raises(CoordinationError, match=f"refused {2 - len([p for p in pushed if p])} of 2"):
        send_and_receive(grid, messages, timeout=1.0)
