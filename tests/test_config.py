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
