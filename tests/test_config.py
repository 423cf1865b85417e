import tomllib
from pathlib import Path

import pytest

from deca_flower.config import ConfigError, DecaConfig

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_run_config_mirrors_the_dataclass_defaults():
    flwr_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert flwr_config == DecaConfig().to_run_config()


def test_every_problem_is_reported_at_once_before_any_loading():
    with pytest.raises(ConfigError) as info:
        DecaConfig(topology="star", method="sgd", lr=-1.0, alpha=0.0, layers_per_block=0, model="/no/such/model",
                   dataset="./missing.jsonl")
    text = str(info.value)
    for fragment in ("topology='star'", "method='sgd'", "lr must be >= 0", "alpha must be > 0", "layers-per-block must be > 0",
                     "model path '/no/such/model' does not exist", "dataset file './missing.jsonl' does not exist"):
        assert fragment in text


def test_run_config_overrides_and_unknown_keys():
    cfg = DecaConfig.from_run_config({**DecaConfig().to_run_config(), "num-nodes": 8, "bma": "none"})
    assert (cfg.num_nodes, cfg.bma) == (8, "none")
    with pytest.raises(ConfigError, match="unknown config key 'num-node'"):
        DecaConfig.from_run_config({"num-node": 3})


def test_preset_then_explicit_override(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("num-nodes: 6\ntopology: ring\n")
    cfg = DecaConfig.from_run_config({"preset": str(preset), "topology": "complete"})
    assert (cfg.num_nodes, cfg.topology) == (6, "complete")
    preset.write_text("nodes: 6\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        DecaConfig.from_run_config({"preset": str(preset)})
    with pytest.raises(ConfigError, match="not found"):
        DecaConfig.from_run_config({"preset": "no-such-preset"})


def test_wrong_types_and_non_finite_values_are_refused_by_name():
    from deca_flower.cli import parse_overrides

    with pytest.raises(ConfigError) as info:  # as typed on the command line
        DecaConfig.from_run_config(parse_overrides(
            "resume='false' rounds=2.0 max-block-deviation=nan lr=inf beta1='0.9' seed=true"))
    text = str(info.value)
    for fragment in ("resume must be true or false, got 'false'", "rounds must be an integer, got 2.0",
                     "max-block-deviation must be finite", "lr must be finite", "beta1 must be a number, got '0.9'",
                     "seed must be an integer, got True"):
        assert fragment in text
    assert DecaConfig(lr=1).lr == 1  # an integer is a number


def test_a_graph_the_node_count_cannot_have_is_refused_before_nodes_connect():
    with pytest.raises(ConfigError, match="topology='torus' with num-nodes=4: torus needs"):
        DecaConfig(topology="torus", num_nodes=4)
    with pytest.raises(ConfigError, match="'ring' needs at least 3 nodes"):
        DecaConfig(topology="ring", num_nodes=2)
    assert DecaConfig(topology="torus", num_nodes=9).num_nodes == 9
    assert DecaConfig(method="fedavg", topology="ring", num_nodes=2).num_nodes == 2  # FedAvg has no graph


def test_a_preset_says_which_values_a_default_cannot_undo(tmp_path, caplog):
    preset = tmp_path / "p.yaml"
    preset.write_text("lr: 5.0e-5\nnum-nodes: 6\n")
    cfg = DecaConfig.from_run_config({**DecaConfig().to_run_config(), "preset": str(preset), "num-nodes": 5})
    assert (cfg.lr, cfg.num_nodes) == (5e-5, 5)
    assert "sets lr=5e-05; a run-config value equal to the app default cannot undo" in caplog.text


def test_an_unparsable_run_config_is_a_message_not_a_traceback(capsys):
    from deca_flower.cli import main

    assert main(["reference", "--run-config", "bma=none"]) == 2  # a string needs quotes
    assert "--run-config 'bma=none'" in capsys.readouterr().err
