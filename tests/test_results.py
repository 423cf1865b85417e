"""A run folder reused by a fresh run keeps the earlier run's files instead of wiping them."""

import json

import torch
from flwr.app import ArrayRecord

from deca_flower.flower.fedavg_client import parameters
from deca_flower.results import RunWriter


def test_a_fresh_run_under_a_used_name_sets_the_earlier_run_aside(tmp_path):
    run_dir = tmp_path / "deca"
    first = RunWriter(run_dir)
    first.append({"kind": "eval", "step": 0, "nodes": 4})
    first.write_summary({"accuracy": 0.8})
    (run_dir / "checkpoint.json").write_text(json.dumps({"visit": 7}))
    (run_dir / "nodes").mkdir()  # node state: the nodes' own to reset

    second = RunWriter(run_dir)
    assert second.lines == 0 and (run_dir / "metrics.jsonl").read_text() == ""
    assert not (run_dir / "checkpoint.json").exists() and not (run_dir / "summary.json").exists()
    previous = run_dir / "previous"
    assert json.loads((previous / "summary.json").read_text()) == {"accuracy": 0.8}
    assert json.loads((previous / "checkpoint.json").read_text()) == {"visit": 7}
    assert len((previous / "metrics.jsonl").read_text().splitlines()) == 1
    assert (run_dir / "nodes").is_dir()

    resumed = RunWriter(run_dir, keep_lines=0)  # resume keeps the folder as it is
    assert resumed.lines == 0 and (previous / "summary.json").exists()


def test_fedavg_sends_bf16_weights_as_fp32():
    """A GPU node's model is bf16, which ArrayRecord cannot hold."""
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    record = ArrayRecord(parameters(model))
    state = record.to_torch_state_dict()
    assert {t.dtype for t in state.values()} == {torch.float32}
    assert torch.equal(state["weight"], model.weight.detach().float())
