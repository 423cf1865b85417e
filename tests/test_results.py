"""A run's folder: nothing an earlier run left is lost to a fresh start, a failed start or a resume."""

import json
import os

import pytest
import torch
from flwr.app import ArrayRecord

from deca_flower.flower.fedavg_client import parameters
from deca_flower.results import RunFolderError, RunWriter, check_run_folder


def finished_run(run_dir):
    writer = RunWriter(run_dir)
    writer.append({"kind": "eval", "step": 0, "nodes": 4})
    writer.write_summary({"accuracy": 0.8})
    (run_dir / "checkpoint.json").write_text(json.dumps({"visit": 7}))
    (run_dir / "nodes").mkdir()  # node state: the nodes' own to reset
    return writer


def listing(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))


def test_a_fresh_run_under_a_used_name_sets_the_earlier_run_aside_when_it_starts(tmp_path):
    run_dir = tmp_path / "deca"
    finished_run(run_dir)
    before = listing(run_dir)

    second = RunWriter(run_dir)  # set-up: nothing moves yet (a start that fails here loses nothing)
    assert listing(run_dir) == before and second.lines == 0
    second.write_config({"lr": 0.1})  # the run begins
    assert (run_dir / "metrics.jsonl").read_text() == ""
    assert not (run_dir / "checkpoint.json").exists() and not (run_dir / "summary.json").exists()
    previous = run_dir / "previous"
    assert json.loads((previous / "summary.json").read_text())["accuracy"] == 0.8
    assert json.loads((previous / "checkpoint.json").read_text()) == {"visit": 7}
    assert len((previous / "metrics.jsonl").read_text().splitlines()) == 1
    assert (run_dir / "nodes").is_dir()

    resumed = RunWriter(run_dir, keep_lines=0)  # resume keeps the folder as it is
    resumed.append({"kind": "step"})
    assert resumed.lines == 1 and (previous / "summary.json").exists()


@pytest.mark.parametrize("left", ["checkpoint.json", "summary.json"])
def test_a_fresh_start_over_an_earlier_run_is_refused_unless_overwrite(tmp_path, left):
    run_dir = tmp_path / "deca"
    finished_run(run_dir)
    (run_dir / ({"checkpoint.json", "summary.json"} - {left}).pop()).unlink()
    before = listing(run_dir)
    with pytest.raises(RunFolderError, match=rf"holds an earlier run \({left}\): resume=true continues it, "
                                             "overwrite=true starts afresh"):
        check_run_folder(run_dir, resume=False, overwrite=False)
    check_run_folder(run_dir, resume=False, overwrite=True)
    assert listing(run_dir) == before  # checking moves nothing


def test_a_fresh_start_over_a_start_that_never_finished_a_visit_or_a_new_folder_is_allowed(tmp_path):
    run_dir = tmp_path / "deca"
    check_run_folder(run_dir, resume=False, overwrite=False)  # no folder yet
    writer = RunWriter(run_dir)
    writer.write_config({"lr": 0.1})
    writer.append({"kind": "step"})
    check_run_folder(run_dir, resume=False, overwrite=False)  # config + metrics only: nothing to resume


def test_resume_needs_a_checkpoint(tmp_path):
    finished_run(tmp_path / "done")
    with pytest.raises(RunFolderError, match=r"holds no checkpoint.json \(there is no run there\); run folders "
                                             r"with a checkpoint under .*: \['done'\]"):
        check_run_folder(tmp_path / "typo", resume=True, overwrite=False)
    started = RunWriter(tmp_path / "started")
    started.write_config({"lr": 0.1})
    with pytest.raises(RunFolderError, match="stopped before every node had saved a block visit: start it again"):
        check_run_folder(tmp_path / "started", resume=True, overwrite=False)
    check_run_folder(tmp_path / "done", resume=True, overwrite=False)


def test_fedavg_sends_bf16_weights_as_fp32():
    """A GPU node's model is bf16, which ArrayRecord cannot hold."""
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    record = ArrayRecord(parameters(model))
    state = record.to_torch_state_dict()
    assert {t.dtype for t in state.values()} == {torch.float32}
    assert torch.equal(state["weight"], model.weight.detach().float())


def test_a_summary_names_the_code_and_the_machine_that_made_it(tmp_path):
    writer = RunWriter(tmp_path / "run")
    writer.write_summary({"accuracy": 0.8})
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["accuracy"] == 0.8
    assert summary["code"] != "" and f"{os.cpu_count()} CPUs" in summary["machine"]
