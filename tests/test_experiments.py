"""Shipped presets and experiments parse, validate, and start on a local model dir."""

from pathlib import Path

import pytest

from deca_flower.compare import load_experiment, run_config_string
from deca_flower.config import DecaConfig
from deca_flower.models import byte_tokenizer, tiny_random_model
from deca_flower.runtime import build_runtime

EXPERIMENTS = sorted((Path(__file__).resolve().parent.parent / "conf" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if p.stem != "paper-qwen"], ids=lambda p: p.stem)
def test_experiments_validate_every_run(path):
    spec = load_experiment(path)
    assert len(spec["runs"]) >= 2  # a comparison


def test_paper_qwen_preset_starts_on_a_local_model_dir(tmp_path):
    model_dir = tmp_path / "qwen-stand-in"
    tiny_random_model(0).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    cfg = DecaConfig.from_run_config({"preset": "paper-qwen", "model": str(model_dir)})
    assert (cfg.num_nodes, cfg.rounds, cfg.steps_per_block, cfg.lr) == (8, 4, 48, 5e-5)
    runtime = build_runtime(cfg.replace(eval_samples=8), 0)
    runtime.node.start_block(1)
    loss, _ = runtime.node.local_step()
    assert loss > 0


def test_run_config_string_round_trips_through_flowers_parser():
    from deca_flower.cli import parse_overrides

    values = {"method": "deca", "lr": 0.001, "eval-initial": False, "num-nodes": 4}
    assert parse_overrides(run_config_string(values)) == values


def test_a_failed_run_loses_no_earlier_result(tmp_path, monkeypatch):
    import json

    from deca_flower import compare as cmp

    spec_file = tmp_path / "three.yaml"
    spec_file.write_text("config: {model: tiny-random}\nruns: [{label: a}, {label: b}, {label: c}]\n")
    out_dir = tmp_path / "results" / "three"

    def summary(accuracy):
        return {"final": {"accuracy_mean": accuracy, "accuracy_std": 0.0, "macro_f1_mean": 0.0, "macro_f1_std": 0.0},
                "method": "deca", "topology": "ring", "bytes_sent_per_node": 1, "wall_time_s": 1, "inner_steps": 1,
                "headline": ["accuracy", "macro_f1"]}

    for label in "abc":  # an earlier compare of all three
        (out_dir / "runs" / label).mkdir(parents=True)
        (out_dir / "runs" / label / "metrics.jsonl").write_text(
            json.dumps({"kind": "eval", "step": 1, "bytes_sent_per_node": 1, "accuracy_mean": 0.1}) + "\n")
    (out_dir / "results.json").write_text(json.dumps({label: summary(0.1) for label in "abc"}))

    def run_one(spec, run, out):
        if run.label == "c":
            raise RuntimeError("c failed")
        return {**summary(0.9), "command": "flwr run ..."}

    monkeypatch.setattr(cmp, "ROOT", tmp_path)
    monkeypatch.setattr(cmp, "run_one", run_one)
    with pytest.raises(RuntimeError, match="c failed"):
        cmp.compare(str(spec_file), only=["a", "c"])
    results = json.loads((out_dir / "results.json").read_text())
    assert list(results) == ["a", "b", "c"]
    assert [results[k]["final"]["accuracy_mean"] for k in "abc"] == [0.9, 0.1, 0.1]


def test_a_setting_can_limit_the_seeds_run_in_it(tmp_path):
    from deca_flower.compare import plan_runs

    spec = {"config": {}, "seeds": [0, 1, 2],
            "settings": [{"name": "small", "config": {}}, {"name": "large", "config": {"num-nodes": 8}, "seeds": [0, 1]}],
            "runs": [{"label": "none", "seeds": [0, 1, 2, 3]}, {"label": "full"}, {"label": "raw", "settings": ["small"]}]}
    keys = [r.key for r in plan_runs(spec, tmp_path)]
    assert keys == ["small/none/seed0", "small/full/seed0", "small/raw/seed0", "small/none/seed1", "small/full/seed1",
                    "small/raw/seed1", "small/none/seed2", "small/full/seed2", "small/raw/seed2", "small/none/seed3",
                    "large/none/seed0", "large/full/seed0", "large/none/seed1", "large/full/seed1"]


def test_a_finished_run_made_before_a_key_existed_is_skipped_only_if_it_matches(tmp_path):
    import json

    from omegaconf import OmegaConf

    from deca_flower.compare import is_finished, plan_runs

    spec = {"config": {"model": "tiny-random"}, "runs": [{"label": "old"}, {"label": "strong", "bma-strength": 10.0},
                                                         {"label": "weak", "bma-strength": 1.0}]}
    runs = {r.label: r for r in plan_runs(spec, tmp_path)}
    saved = DecaConfig.from_run_config({"model": "tiny-random"}).to_run_config()
    for key in ("bma-strength", "compression", "consensus-step-size"):  # keys added after the run was made
        del saved[key]
    for label in runs:
        (tmp_path / label).mkdir()
        (tmp_path / label / "summary.json").write_text(json.dumps({}))
        OmegaConf.save(OmegaConf.create(saved), tmp_path / label / "config.yaml")
    # a run without bma-strength behaved as strength 1 (its first default), whatever today's default is
    assert not is_finished(runs["strong"], tmp_path / "strong")
    assert is_finished(runs["weak"], tmp_path / "weak")
    assert is_finished(runs["old"], tmp_path / "old") == (DecaConfig().bma_strength == 1.0)
