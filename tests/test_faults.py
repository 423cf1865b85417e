"""Fault injection: nodes that go silent or crash are dropped, W is recomputed over the rest."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from apps.client_app import app as client_app
from deca_flower.core.topology import build_graph, check_mixing_matrix, metropolis_hastings
from deca_flower.flower import state
from deca_flower.flower.coordinator import Coordinator
from deca_flower.flower.job import connect, coordinator_for, run_deca
from deca_flower.flower.transport import CoordinationError
from deca_flower.paths import prepare_run
from deca_flower.results import RunFolderError, RunWriter
from tests.inprocess import InProcessGrid, KilledRun


def run_with_faults(cfg, silent=None, crash=None, gone=None):
    state._WARM.clear()
    cfg, run_dir = prepare_run(cfg)
    grid = InProcessGrid(client_app, cfg.num_nodes)
    grid.silent_after = {100 + pid: n for pid, n in (silent or {}).items()}
    grid.crash_after = {100 + pid: n for pid, n in (crash or {}).items()}
    grid.gone_after = {100 + pid: n for pid, n in (gone or {}).items()}
    summary = run_deca(grid, cfg, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, records


@pytest.mark.parametrize("compression", ["none", "int4"])
def test_silent_node_is_dropped_and_the_rest_finish(tiny_cfg, compression):
    # dropped mid-visit: compressed, its neighbours mix on the public copies of the others only
    summary, records = run_with_faults(tiny_cfg.replace(num_nodes=5, topology="ring", compression=compression),
                                       silent={2: 3})
    assert list(summary["dropped_nodes"]) == [2] and "no reply" in summary["dropped_nodes"][2]
    assert [r["node"] for r in records if r["kind"] == "dropout"] == [2]
    assert summary["final"]["accuracy_per_node"] and len(summary["final"]["accuracy_per_node"]) == 4


def test_crashed_node_is_dropped_too(tiny_cfg):
    summary, _ = run_with_faults(tiny_cfg.replace(num_nodes=5, topology="ring"), crash={4: 2})
    assert list(summary["dropped_nodes"]) == [4] and "simulated crash" in summary["dropped_nodes"][4]


def test_a_node_the_superlink_reports_unavailable_is_dropped(tiny_cfg):
    """The SuperLink answers for a dead SuperNode, with its own node id as the source."""
    summary, _ = run_with_faults(tiny_cfg.replace(num_nodes=5, topology="ring"), gone={3: 2})
    assert list(summary["dropped_nodes"]) == [3] and "Node Unavailable" in summary["dropped_nodes"][3]
    assert len(summary["final"]["accuracy_per_node"]) == 4


def test_split_graph_stops_or_goes_on_per_component(tiny_cfg):
    cfg = tiny_cfg.replace(num_nodes=5, topology="ring", disconnect_wait_s=0.0)
    with pytest.raises(CoordinationError, match=r"disconnected \(components \[\[0, 4\], \[2\]\]\)"):
        run_with_faults(cfg, silent={1: 2, 3: 2})
    summary, _ = run_with_faults(cfg.replace(on_disconnect="components", overwrite=True), silent={1: 2, 3: 2})
    assert sorted(summary["dropped_nodes"]) == [1, 3] and len(summary["final"]["accuracy_per_node"]) == 3


def test_split_graph_holds_at_the_block_boundary_until_its_nodes_rejoin(tiny_cfg):
    """Nodes 1 and 3 drop in visit 0: 0 and 2 are cut off from each other. The coordinator holds after
    the visit, probing; the two answer the second probe, rejoin, and all 4 finish the run."""
    state._WARM.clear()
    cfg, run_dir = prepare_run(tiny_cfg.replace(disconnect_wait_s=30.0))
    grid = InProcessGrid(client_app, 4)
    grid.silent_after, grid.back_at_probe = {101: 1, 103: 1}, {101: 1, 103: 1}
    summary = run_deca(grid, cfg, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records if r["kind"] in ("dropout", "hold", "rejoin")]
    assert kinds == ["dropout", "dropout", "hold", "rejoin", "rejoin"]
    (hold,) = [r for r in records if r["kind"] == "hold"]
    assert hold["after_visit"] == 0 and "components [[0], [2]]" in hold["reason"]
    assert summary["dropped_nodes"] == {} and len(summary["final"]["accuracy_per_node"]) == 4
    assert grid.probes == {101: 2, 103: 2}


def test_split_graph_that_stays_split_stops_after_the_wait_with_a_checkpoint(tiny_cfg):
    cfg, run_dir = prepare_run(tiny_cfg.replace(disconnect_wait_s=1.5))
    state._WARM.clear()
    grid = InProcessGrid(client_app, 4)
    grid.silent_after = {101: 1, 103: 1}
    started = time.monotonic()
    with pytest.raises(CoordinationError, match=r"components \[\[0\], \[2\]\]\), still after probing for "
                                                r"rejoins for disconnect-wait-s=1.5: stopped after visit 0"):
        run_deca(grid, cfg, run_dir)
    assert time.monotonic() - started >= 1.5
    assert json.loads((run_dir / "checkpoint.json").read_text())["visit"] == 0


def set_up(cfg, grid):
    """The membership of a job whose nodes are set up, with its graph and W (so failures drop nodes)."""
    cfg, run_dir = prepare_run(cfg)
    membership = connect(grid, cfg, RunWriter(run_dir))
    membership.set_up(membership.wait_for_nodes())
    membership.graph = build_graph(cfg.topology, cfg.num_nodes, seed=cfg.seed, edge_prob=cfg.edge_prob)
    membership.weights = metropolis_hastings(membership.graph)
    return membership, coordinator_for(membership, cfg)


def test_weights_after_dropout_are_doubly_stochastic_over_survivors(tiny_cfg):
    state._WARM.clear()  # the irregular graph 0-3, 1-2, 1-3, 2-3 without node 1: the path 0-3-2
    membership, _ = set_up(tiny_cfg, InProcessGrid(client_app, 4))
    membership.drop({1: "test"}, step=0)
    w = membership.weights
    check_mixing_matrix(w)
    expected = np.array([[2 / 3, 0, 0, 1 / 3], [0, 1, 0, 0], [0, 0, 2 / 3, 1 / 3], [1 / 3, 0, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(w, expected, rtol=0, atol=1e-15)


# -- resume and rejoin -------------------------------------------------------------------------

def newest_blocks(state_dir):
    """{(node, block): tensors} from the newest saved version of every block of every node."""
    from safetensors.torch import load_file

    newest = {}
    for file in sorted(state_dir.glob("node_*/block_*.v*.safetensors")):
        newest[(file.parent.name, file.name.split(".")[0])] = load_file(file)
    return newest


def comparable(records):
    timings = {"elapsed_s", "step_wall_s", "step_compute_s", "step_compute_sum_s"}
    return [{k: v for k, v in r.items() if k not in timings} for r in records if r["kind"] in ("eval", "visit")]


# 4 nodes, 2 steps per visit, evaluation after every 2nd visit: the message rounds of two visits are
# step, step, step+finish of the previous visit, step, finish (5 rounds = 20 train messages); the
# kill lands on the first node of round 7, 8 or 5
@pytest.mark.parametrize("kill_after", [25, 29, 17],
                         ids=["mid-visit", "during-a-finish-with-the-next-step", "during-a-mix-only-finish"])
def test_killed_run_resumes_to_the_same_numbers(tiny_cfg, tmp_path, kill_after):
    cfg = tiny_cfg.replace(rounds=2, eval_every_blocks=2)  # the irregular 4-node graph
    whole, whole_records = run_with_faults(cfg.replace(run_name="whole", state_dir=str(tmp_path / "whole")))

    state._WARM.clear()
    cfg = cfg.replace(run_name="killed", state_dir=str(tmp_path / "killed"))
    killed_cfg, run_dir = prepare_run(cfg)
    grid = InProcessGrid(client_app, cfg.num_nodes)
    grid.kill_after = kill_after
    with pytest.raises(KilledRun):
        run_deca(grid, killed_cfg, run_dir)
    state._WARM.clear()  # the node processes died with it
    resumed_cfg, run_dir = prepare_run(cfg.replace(resume=True))
    resumed = run_deca(InProcessGrid(client_app, cfg.num_nodes, run_id=8), resumed_cfg, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert resumed["final"] == whole["final"] and resumed["inner_steps"] == whole["inner_steps"]
    assert comparable(records) == comparable(whole_records)  # losses, consensus distances, evaluations
    whole_blocks, resumed_blocks = newest_blocks(tmp_path / "whole"), newest_blocks(tmp_path / "killed")
    assert whole_blocks.keys() == resumed_blocks.keys() and len(whole_blocks) > 3
    for key, tensors in whole_blocks.items():
        for name, value in tensors.items():
            assert torch.equal(value, resumed_blocks[key][name]), (key, name)


def test_a_visit_is_recorded_only_after_every_node_saved_it(tiny_cfg, monkeypatch):
    """Finished blocks are written in the background while the next step runs (a slow disk here):
    the coordinator's checkpoint must still never name a visit whose files a node is writing."""
    import threading
    import time

    write, writers, recorded = state._write_blocks, set(), []

    def slow_write(*args):
        writers.add(threading.current_thread().name)
        time.sleep(0.2)
        write(*args)

    def checked(self, checkpoint):
        for pid in range(cfg.num_nodes):
            assert (Path(cfg.state_dir) / f"node_{pid:03d}" / f"checkpoint.v{checkpoint['visit']:05d}.json").is_file()
        recorded.append(checkpoint["visit"])
        record(self, checkpoint)

    monkeypatch.setattr(state, "_write_blocks", slow_write)
    record = Coordinator._checkpoint
    monkeypatch.setattr(Coordinator, "_checkpoint", checked)
    cfg = tiny_cfg.replace(rounds=2, steps_per_block=1)
    summary, _ = run_with_faults(cfg)
    assert any(name.startswith("deca-save") for name in writers)  # the background path ran
    assert recorded == sorted(recorded) and recorded[-1] == summary["inner_steps"] - 1  # 1 step per visit


def test_resume_refuses_a_changed_config_or_a_missing_run(tiny_cfg):
    grid = InProcessGrid(client_app, 4)
    with pytest.raises(RunFolderError, match=r"holds no checkpoint.json \(there is no run there\)"):
        cfg, run_dir = prepare_run(tiny_cfg.replace(run_name="never-ran", resume=True))
        run_deca(grid, cfg, run_dir)
    assert grid.sent == 0 and not run_dir.exists()  # refused before any node was asked anything
    run_with_faults(tiny_cfg.replace(overwrite=True))
    with pytest.raises(CoordinationError, match=r"differs from the run's saved config: \{'lr'"):
        cfg, run_dir = prepare_run(tiny_cfg.replace(resume=True, lr=0.5))  # (overwrite may differ: not 'lr' only)
        run_deca(InProcessGrid(client_app, 4), cfg, run_dir)


def test_resume_without_a_checkpoint_is_an_error_not_a_restart(tiny_cfg):
    cfg, run_dir = prepare_run(tiny_cfg)
    grid = InProcessGrid(client_app, 4)
    grid.kill_after = 1  # killed in its first step: config.yaml and metrics.jsonl, no checkpoint
    with pytest.raises(KilledRun):
        run_deca(grid, cfg, run_dir)
    before = sorted(p.name for p in run_dir.iterdir())
    grid = InProcessGrid(client_app, 4, run_id=8)
    with pytest.raises(RunFolderError, match="stopped before every node had saved a block visit: start it again"):
        run_deca(grid, *prepare_run(tiny_cfg.replace(resume=True)))
    assert grid.sent == 0 and sorted(p.name for p in run_dir.iterdir()) == before


def test_a_fresh_start_never_replaces_an_earlier_run_unless_asked(tiny_cfg):
    summary, _ = run_with_faults(tiny_cfg)
    cfg, run_dir = prepare_run(tiny_cfg)
    files = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    grid = InProcessGrid(client_app, 4)
    with pytest.raises(RunFolderError, match="holds an earlier run .*overwrite=true starts afresh"):
        run_deca(grid, cfg, run_dir)
    assert grid.sent == 0 and files == {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    # overwrite=true, but the start fails while the nodes set up: still nothing moved
    with pytest.raises(CoordinationError, match=r"only 2 of 4 SuperNodes"):
        run_deca(InProcessGrid(client_app, 2), *prepare_run(tiny_cfg.replace(overwrite=True, node_wait_s=0.1)))
    assert files == {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    run_with_faults(tiny_cfg.replace(overwrite=True))
    assert {p.name: p.read_bytes() for p in (run_dir / "previous").iterdir()} == files


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_node_that_comes_back_rejoins_with_a_neighbours_blocks(tiny_cfg, compression):
    # compressed: every node's public copies start afresh with the visit after the rejoin, the
    # rejoined node's from its donated blocks
    state._WARM.clear()
    cfg, run_dir = prepare_run(tiny_cfg.replace(num_nodes=4, topology="complete", rounds=1, compression=compression))
    grid = InProcessGrid(client_app, 4)
    grid.silent_after, grid.back_at = {102: 1}, {102: 14}  # down in visit 0, up again during visit 1
    summary = run_deca(grid, cfg, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (rejoin,) = [r for r in records if r["kind"] == "rejoin"]
    assert rejoin["node"] == 2 and rejoin["blocks"] == [summary["num_blocks"] - 2, summary["num_blocks"] - 1]
    assert summary["dropped_nodes"] == {} and summary["rejoined_nodes"][0]["after_visit"] == 1
    assert len(summary["final"]["accuracy_per_node"]) == 4  # it took part to the end
    # the top block was only trained before the rejoin: node 2 holds exactly its donor's copy
    top = summary["num_blocks"] - 1
    saved = newest_blocks(Path(cfg.state_dir))
    mine, theirs = saved[("node_002", f"block_{top:03d}")], saved[(f"node_{rejoin['from']:03d}", f"block_{top:03d}")]
    assert all(torch.equal(mine[n], theirs[n]) for n in mine)


def test_a_node_lost_during_an_evaluation_is_dropped_like_in_training(tiny_cfg):
    state._WARM.clear()
    grid = InProcessGrid(client_app, 4)
    membership, coordinator = set_up(tiny_cfg.replace(topology="complete"), grid)
    grid.drop_replies_from = {membership.node_of[3]}
    record = coordinator.evaluate(sorted(membership.node_of), 0, 1, final=True)
    assert record["nodes"] == 3 and list(membership.dropped) == [3]
    check_mixing_matrix(membership.weights[:3, :3])
    grid.drop_replies_from = set(membership.node_of.values())
    with pytest.raises(CoordinationError, match="no node answered the evaluation"):
        coordinator.evaluate([0], 0, -1)


def test_a_run_resumes_without_the_nodes_it_had_dropped(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(num_nodes=4, topology="complete", rounds=2, eval_every_blocks=2, rejoin_probe_s=0.0)
    whole, _ = run_with_faults(cfg.replace(run_name="whole", state_dir=str(tmp_path / "whole")), crash={3: 2})

    state._WARM.clear()
    cfg = cfg.replace(run_name="killed", state_dir=str(tmp_path / "killed"))
    killed_cfg, run_dir = prepare_run(cfg)
    grid = InProcessGrid(client_app, cfg.num_nodes)
    grid.crash_after, grid.kill_after = {103: 2}, 22
    with pytest.raises(KilledRun):
        run_deca(grid, killed_cfg, run_dir)
    assert json.loads((run_dir / "checkpoint.json").read_text())["dropped"].keys() == {"3"}
    state._WARM.clear()
    survivors = {pid: {"partition-id": pid, "num-partitions": 4} for pid in range(3)}  # node 3 stays gone
    resumed_cfg, run_dir = prepare_run(cfg.replace(resume=True))
    resumed = run_deca(InProcessGrid(client_app, 3, run_id=8, node_configs=survivors), resumed_cfg, run_dir)
    assert list(resumed["dropped_nodes"]) == [3] and resumed["final"] == whole["final"]
    whole_blocks, resumed_blocks = newest_blocks(tmp_path / "whole"), newest_blocks(tmp_path / "killed")
    assert whole_blocks.keys() == resumed_blocks.keys() and len(whole_blocks) > 3
    for key, tensors in whole_blocks.items():
        assert all(torch.equal(value, resumed_blocks[key][name]) for name, value in tensors.items()), key

    state._WARM.clear()
    resumed_cfg, run_dir = prepare_run(cfg.replace(resume=True))
    node_3_back_not_1 = {0: survivors[0], 1: survivors[2], 2: {"partition-id": 3, "num-partitions": 4}}
    with pytest.raises(CoordinationError, match=r"without partition\(s\) \[1\]"):  # 1 was taking part
        run_deca(InProcessGrid(client_app, 3, run_id=9, node_configs=node_3_back_not_1), resumed_cfg, run_dir)
