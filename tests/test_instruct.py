"""Instruction tuning: the embedded chatterbot set, local/hub-style files, and a run through the Flower path."""

import json
from collections import Counter

import pytest

from apps.client_app import app as client_app
from deca_flower.config import ConfigError
from deca_flower.data.instructions import load_instructions
from deca_flower.data.sources import DataError
from deca_flower.flower import state
from deca_flower.flower.job import run_deca
from deca_flower.paths import prepare_run
from deca_flower.runtime import node_partition, partitioner_for
from tests.inprocess import InProcessGrid


def test_chatterbot_english_pairs_and_a_non_iid_split_by_category(tiny_cfg):
    data = load_instructions("chatterbot-english")
    categories = data.features["label"].names
    assert len(data) > 1000 and len(categories) == 21 and {"ai", "trivia", "tech_support"} <= set(categories)
    assert len(set(zip(data["text"], data["response"]))) == len(data)  # repeats dropped
    cfg = tiny_cfg.replace(task="instruct", dataset="chatterbot-english", num_nodes=4)
    parts = [Counter(node_partition(partitioner_for(cfg), pid)["label"]) for pid in range(4)]
    tops = [counts.most_common(1)[0][0] for counts in parts]
    assert len(set(tops)) > 1  # Dirichlet(0.25) over categories: nodes see different topics


def test_alpaca_style_file_gets_first_word_categories(tmp_path):
    rows = [{"instruction": f"{verb} something {i}", "input": "x" if i % 2 else "", "output": f"answer {i}"}
            for i, verb in enumerate(["Write", "Explain", "Give", "List"] * 5)]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_instructions(str(path))
    assert data.features["label"].names == ["explain", "give", "list", "write"]
    assert data[1]["text"] == "Explain something 1\nx" and data[1]["response"] == "answer 1"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}))
    with pytest.raises(DataError, match="needs an instruction"):
        load_instructions(str(tmp_path / "bad.jsonl"))
    (tmp_path / "gap.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:3] + [{"instruction": None, "output": "a"}]))
    with pytest.raises(DataError, match=r"1 row\(s\) with a missing or empty 'instruction' \(rows \[3\]"):
        load_instructions(str(tmp_path / "gap.jsonl"))  # not a prompt reading "None"
    with_categories = [{**r, "category": "greet"} for r in rows[:3]] + [{**rows[3], "category": ""}]
    (tmp_path / "category.jsonl").write_text("\n".join(json.dumps(r) for r in with_categories))
    with pytest.raises(DataError, match=r"missing or empty 'category' \(rows \[3\]"):
        load_instructions(str(tmp_path / "category.jsonl"))  # not a category named "" or "None"


def test_instruct_needs_instruction_data(tiny_cfg):
    with pytest.raises(ConfigError, match="task='instruct' needs instruction data"):
        tiny_cfg.replace(task="instruct")


def test_instruction_tuning_run_lowers_response_loss_and_writes_samples(tiny_cfg):
    state._WARM.clear()
    cfg, run_dir = prepare_run(tiny_cfg.replace(task="instruct", dataset="chatterbot-english", steps_per_block=6,
                                                max_response_tokens=24, lr=3e-3, samples=2))
    summary = run_deca(InProcessGrid(client_app, cfg.num_nodes), cfg, run_dir)
    assert summary["headline"] == ["response_loss", "perplexity"]
    assert summary["final"]["response_loss_mean"] < summary["initial"]["response_loss"]
    assert summary["final"]["perplexity_mean"] == pytest.approx(
        sum(__import__("math").exp(v) for v in summary["final"]["response_loss_per_node"]) / cfg.num_nodes)
    samples = (run_dir / "samples.md").read_text()
    assert samples.count("## node") == cfg.num_nodes and samples.count("Question: ") == 2 * cfg.num_nodes
    assert (run_dir / "response_loss.png").is_file()
