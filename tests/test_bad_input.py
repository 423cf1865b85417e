"""Bad input gets a clear error that names what is wrong; nothing bad enters a model."""

import math

import pytest
import torch
from flwr.app import Message, RecordDict

from apps.client_app import app as client_app
from deca_flower.core.topology import build_graph, metropolis_hastings
from deca_flower.data.sources import DataError
from deca_flower.flower import state
from deca_flower.flower.job import connect, coordinator_for, run_deca
from deca_flower.flower.transport import CoordinationError, Transport
from deca_flower.paths import prepare_run
from deca_flower.protocol import messages as pm
from deca_flower.protocol.packing import consensus_distance
from deca_flower.protocol.tensors import block_to_record, record_to_block
from deca_flower.results import RunWriter
from deca_flower.runtime import build_runtime, node_data
from tests.inprocess import InProcessGrid


def started_coordinator(cfg, tmp_path, **grid_args):
    """A coordinator whose nodes are set up, with W of the config's graph; the graph itself is not
    set, so a node that fails stops the run instead of being dropped."""
    state._WARM.clear()
    cfg, run_dir = prepare_run(cfg)
    grid = InProcessGrid(client_app, cfg.num_nodes, **grid_args)
    membership = connect(grid, cfg, RunWriter(run_dir))
    membership.set_up(membership.wait_for_nodes())
    membership.weights = metropolis_hastings(build_graph(cfg.topology, cfg.num_nodes, seed=cfg.seed,
                                                         edge_prob=cfg.edge_prob))
    return coordinator_for(membership, cfg), grid


def warm_runtime(coordinator, grid, pid):
    return state._WARM[(grid.run_id, coordinator.membership.node_of[pid])]


def train_message(coordinator, pid, neighbour_blocks):
    weights = coordinator.membership.weights  # the graph's W: the node checks it before the blocks
    ask = pm.TrainStep(step=1, block=1, self_weight=float(weights[pid, pid]),
                       weights={j: float(weights[pid, j]) for j in neighbour_blocks},
                       halves={j: block_to_record(block) for j, block in neighbour_blocks.items()})
    return pm.request(coordinator.membership.node_of[pid], ask)


@pytest.mark.parametrize(("corrupt", "message"), [
    (lambda b: {k: v.fill_(math.nan) for k, v in b.items()}, "NaN or Inf"),
    (lambda b: {k: v.reshape(-1) for k, v in b.items()}, "shape"),
    (lambda b: {k: v.half() for k, v in b.items()}, "dtype"),
    (lambda b: dict(list(b.items())[1:]), "missing"),
])
def test_bad_neighbour_block_is_refused_by_the_mod(tiny_cfg, tmp_path, corrupt, message):
    cfg = tiny_cfg.replace(num_nodes=3, topology="complete")
    coordinator, grid = started_coordinator(cfg, tmp_path)
    coordinator.exchange(block=1, start=True)
    runtime = warm_runtime(coordinator, grid, 0)
    before = {k: v.clone() for k, v in runtime.node.block_values().items()}
    good = {k: v.clone() for k, v in before.items()}
    bad = corrupt({k: v.clone() for k, v in before.items()})
    [reply] = grid.send_and_receive([train_message(coordinator, 0, {1: good, 2: bad})])
    assert reply.has_error() and message in reply.error.reason and "node 2" in reply.error.reason
    for name, value in runtime.node.block_values().items():  # nothing was mixed in
        assert torch.equal(value, before[name])


def test_coordinator_stops_with_the_node_named_on_an_error_reply(tiny_cfg, tmp_path):
    coordinator, grid = started_coordinator(tiny_cfg.replace(num_nodes=3, topology="complete"), tmp_path)
    coordinator.exchange(block=1, start=True)
    half = coordinator.progress.halves[2]
    half.half = block_to_record({k: torch.full_like(v, math.inf) for k, v in record_to_block(half.half, "t").items()})
    with pytest.raises(CoordinationError, match=r"node 10\d failed: node \d: .*node 2.*NaN or Inf"):
        coordinator.exchange(block=1, start=False)


def test_missing_nodes_and_missing_replies_are_reported(tiny_cfg, tmp_path):
    cfg, run_dir = prepare_run(tiny_cfg.replace(num_nodes=3, node_wait_s=1))
    with pytest.raises(CoordinationError, match=r"only 2 of 3 SuperNodes \(num-nodes=3\)"):
        run_deca(InProcessGrid(client_app, 2), cfg, run_dir)
    coordinator, grid = started_coordinator(tiny_cfg.replace(num_nodes=3, topology="complete"), tmp_path)
    grid.drop_replies_from = {coordinator.membership.node_of[1]}
    with pytest.raises(CoordinationError, match="1 of 3 nodes did not reply"):
        coordinator.exchange(block=0, start=True)


def test_node_without_partition_id_is_refused(tiny_cfg, tmp_path):
    configs = {0: {}, 1: {"partition-id": 1}, 2: {"partition-id": 2}, 3: {"partition-id": 3}}
    with pytest.raises(CoordinationError, match="node 100 failed: NodeSetupError: node-config lacks 'partition-id'"):
        started_coordinator(tiny_cfg, tmp_path, node_configs=configs)


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
    coordinator.exchange(block=1, start=True)
    runtime = warm_runtime(coordinator, grid, 0)
    own = {k: v.clone() for k, v in runtime.node.block_values().items()}
    good = {k: v + 1.0 for k, v in own.items()}
    bad = {k: torch.full_like(v, math.nan) for k, v in own.items()}
    [reply] = grid.send_and_receive([train_message(coordinator, 0, {1: good, 2: bad})])
    assert not reply.has_error()
    result = pm.StepResult.from_content(reply.content)
    assert len(result.excluded) == 1 and result.excluded[0].startswith("node 2: ") and "NaN or Inf" in result.excluded[0]
    # self weight 1/3 + the excluded 1/3 -> mixed = 2/3 * own + 1/3 * (own + 1); then one Adam step (lr 1e-3)
    mixed_then_stepped = runtime.node.block_values()
    for name, value in own.items():
        torch.testing.assert_close(mixed_then_stepped[name], value + 1 / 3, atol=2e-3, rtol=0)


def test_absurdly_far_block_is_refused(tiny_cfg, tmp_path):
    coordinator, grid = started_coordinator(tiny_cfg.replace(num_nodes=3, topology="complete"), tmp_path)
    coordinator.exchange(block=1, start=True)
    own = warm_runtime(coordinator, grid, 0).node.block_values()
    far = {k: v * 100.0 for k, v in own.items()}
    [reply] = grid.send_and_receive([train_message(coordinator, 0, {1: far, 2: dict(own)})])
    assert reply.has_error() and "max-block-deviation" in reply.error.reason



def test_a_half_that_does_not_decode_or_match_is_left_out_of_the_consensus_distance(tiny_cfg, tmp_path, caplog):
    # on-bad-block=exclude: the nodes left such a half out and went on; the relay's metric must too
    coordinator, _ = started_coordinator(tiny_cfg.replace(num_nodes=3, topology="complete"), tmp_path)
    coordinator.exchange(block=1, start=True)
    halves = {pid: result.half for pid, result in coordinator.progress.halves.items()}
    x0, x2 = (record_to_block(halves[pid], "t") for pid in (0, 2))
    halves[1] = block_to_record({k: v.reshape(-1) for k, v in record_to_block(halves[1], "t").items()})
    with caplog.at_level("WARNING"):
        distance = consensus_distance(halves)
    # two nodes left: each is half their difference away from the mean
    assert distance == pytest.approx(sum(float(((x0[k] - x2[k]) ** 2).sum()) for k in x0) / 4)
    assert "node 1's half has other tensors" in caplog.text
    halves[2] = block_to_record({"w": torch.zeros(2)})
    halves[2]["block"].data = bytes(halves[2]["block"].data)[:-4]  # truncated
    with caplog.at_level("WARNING"):
        assert consensus_distance(halves) == 0.0  # node 0 alone
    assert "block from node 2" in caplog.text and "its manifest describes" in caplog.text


@pytest.mark.parametrize("pushed", [[], ["id-1", None]], ids=["HTTP 413", "one refused"])
def test_messages_the_superlink_refuses_stop_the_exchange(pushed, monkeypatch):
    from types import SimpleNamespace

    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):  # as in a ServerApp process
        monkeypatch.setattr(TaskIdentity, name, 7)
    grid = SimpleNamespace(push_messages=lambda messages: pushed)
    with pytest.raises(CoordinationError, match=f"refused {2 - len([p for p in pushed if p])} of 2"):
        Transport(grid, reply_timeout_s=1.0).send({1: pm.Evaluate(), 2: pm.Evaluate()})


def test_a_message_without_what_its_type_needs_is_refused_by_the_node(tiny_cfg, tmp_path):
    coordinator, grid = started_coordinator(tiny_cfg.replace(num_nodes=3, topology="complete"), tmp_path)
    node_id = coordinator.membership.node_of[0]
    [reply] = grid.send_and_receive([Message(RecordDict(), dst_node_id=node_id, message_type="train.step")])
    assert reply.has_error() and "ProtocolError: message lacks its ConfigRecord 'deca.fields'" in reply.error.reason


@pytest.mark.parametrize("on_bad_block", ["stop", "exclude"])
def test_a_hostile_manifest_blames_its_sender_and_never_crashes_the_receivers(tiny_cfg, tmp_path, on_bad_block):
    """A half whose description would raise inside the decoder (nested too deep, a shape of 10^30 x 0)
    or that is not a packed block at all: each receiver applies on-bad-block naming node 2, and
    no receiver is dropped as if it had crashed."""
    import struct

    from flwr.app import Array, ArrayRecord

    from deca_flower.protocol.packing import PACKED

    def packed(manifest: bytes) -> ArrayRecord:
        data = struct.pack("<Q", len(manifest)) + manifest + b"\x00" * (-(8 + len(manifest)) % 8)
        return ArrayRecord({"block": Array(dtype="uint8", shape=(len(data),), stype=PACKED, data=data)})

    cfg = tiny_cfg.replace(num_nodes=3, topology="complete", on_bad_block=on_bad_block)
    hostile = {"nested": packed(b"[" * 100_000), "huge": packed(b'[["w", "float32", [1000000000000000000000000000000, 0]]]'),
               "empty": ArrayRecord()}
    for name, record in hostile.items():
        coordinator, _ = started_coordinator(cfg.replace(run_name=name), tmp_path)
        coordinator.membership.graph = build_graph("complete", 3)  # failures now drop nodes, unless refused as bad data
        coordinator.exchange(block=1, start=True)
        coordinator.progress.halves[2].half = record
        if on_bad_block == "stop":
            with pytest.raises(CoordinationError, match=r"node 10[01] failed: node [01]: block from node 2: "):
                coordinator.exchange(block=1, start=False)
        else:
            results = coordinator.exchange(block=1, start=False)
            assert all(r.excluded[0].startswith("node 2: block from node 2:") for pid, r in results.items() if pid != 2)
        assert coordinator.membership.dropped == {}, name


def _nan_scale(payload):
    payload[next(k for k in payload if k.endswith("/scale"))][0] = math.nan


def _short_q(payload):
    key = next(k for k in payload if k.endswith("/q"))
    payload[key] = payload[key][:-1]


def _header_numel(payload):
    payload[next(k for k in payload if k.endswith("/header"))][1] += 1


def _header_as_matrix(payload):
    key = next(k for k in payload if k.endswith("/header"))
    payload[key] = payload[key].reshape(2, 2)


@pytest.mark.parametrize(("compression", "corrupt", "message"), [
    ("int8", _nan_scale, "has a NaN, Inf, negative or overflowing scale"),
    ("int4", _short_q, r"'[^']+/q' is torch.uint8 of shape \(\d+,\); its header .* means torch.uint8 of shape \(\d+,\)"),
    ("int8", _header_numel, "header says"),
    ("int8", _header_as_matrix, r"header of shape \(2, 2\)"),
    ("int8", None, "expected one 'block' array of stype deca-compressed-v1"),  # an uncompressed half instead
])
@pytest.mark.parametrize("on_bad_block", ["stop", "exclude"])
def test_a_malformed_compressed_payload_is_refused_naming_its_sender(tiny_cfg, tmp_path, compression, corrupt, message,
                                                                      on_bad_block):
    from deca_flower.protocol.tensors import payload_to_record, record_to_payload

    cfg = tiny_cfg.replace(num_nodes=3, topology="complete", on_bad_block=on_bad_block, compression=compression)
    coordinator, grid = started_coordinator(cfg, tmp_path)
    coordinator.exchange(block=1, start=True)
    coordinator.exchange(block=1, start=False)  # payloads of seq 1: top-k (seq 0 is int8 for every codec)
    if corrupt is None:
        coordinator.progress.halves[2].half = block_to_record(warm_runtime(coordinator, grid, 2).node.block_values())
    else:
        payload = {k: v.clone() for k, v in record_to_payload(coordinator.progress.halves[2].half, "test").items()}
        corrupt(payload)
        coordinator.progress.halves[2].half = payload_to_record(payload)
    if on_bad_block == "stop":
        with pytest.raises(CoordinationError, match=rf"node 10[01] failed: node [01]: .*block from node 2: .*{message}"):
            coordinator.exchange(block=1, start=False)
        return
    results = coordinator.exchange(block=1, start=False)
    for pid in (0, 1):
        assert len(results[pid].excluded) == 1 and results[pid].excluded[0].startswith("node 2: ")
        assert warm_runtime(coordinator, grid, pid).node.public.out_of_sync == {"node 2"}  # until the next visit
    results = coordinator.exchange(block=1, start=False)  # its later payloads stay out: its copy missed one
    assert all("missed a payload" in results[pid].excluded[0] for pid in (0, 1))


def test_more_supernodes_than_num_nodes_is_refused_naming_the_counts(tiny_cfg):
    cfg, run_dir = prepare_run(tiny_cfg.replace(num_nodes=3, topology="complete"))
    grid = InProcessGrid(client_app, 4)
    with pytest.raises(CoordinationError, match="4 SuperNodes are connected but num-nodes=3"):
        run_deca(grid, cfg, run_dir)
    assert grid.sent == 0  # not "whichever 3 sort first"
