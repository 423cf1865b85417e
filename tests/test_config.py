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


@pytest.mark.parametrize("name", ["../../../victim", "a/b", "a\\b", "..", ".", "a..b", " ", " run", "run\n", "/abs"])
def test_a_run_name_that_could_leave_the_results_folder_is_refused(name):
    with pytest.raises(ConfigError, match="run-name"):
        DecaConfig(run_name=name)


def test_plain_run_names_and_the_generated_one_are_accepted():
    from deca_flower.paths import prepare_run

    for name in ("deca-ring_seed0.v2", "bbc small"):
        assert DecaConfig(run_name=name).run_name == name
    cfg, run_dir = prepare_run(DecaConfig(results_dir="/tmp/runs"))
    assert run_dir.parent == Path("/tmp/runs") and cfg.run_name.startswith("deca-erdos_renyi-")


def test_one_type_error_does_not_hide_the_others_and_num_nodes_1_is_listed():
    from deca_flower.cli import parse_overrides

    with pytest.raises(ConfigError) as info:
        DecaConfig.from_run_config(parse_overrides("rounds=2.0 num-nodes=1 lr=-1 topology='star' seed=-1 "
                                                   "run-name='../x' resume=true overwrite=true"))
    problems = str(info.value).splitlines()[1:]
    for fragment in ("rounds must be an integer, got 2.0", "num-nodes must be >= 2 for gossip, got 1", "lr must be >= 0",
                     "topology='star' is not one of", "seed must be in [0, 2**32 - 1], got -1", "run-name '../x'",
                     "resume=true continues a run and overwrite=true starts it afresh"):
        assert sum(fragment in line for line in problems) == 1, fragment
    with pytest.raises(ConfigError, match=r"seed must be in \[0, 2\*\*32 - 1\], got 4294967296"):
        DecaConfig(seed=2**32)


@pytest.mark.parametrize(("preset", "content"), [
    ("passwd", "root:x:0:0:SECRET-MARK:/root:/bin/bash\n"),                # not a YAML file
    ("passwd.yaml", "root:x:0:0:SECRET-MARK:/root:/bin/bash\nbin:x:2\n"),  # YAML: one odd key
    ("broken.yaml", "lr: [1\n  token: SECRET-MARK\n"),                   # a YAML error quotes the line
    ("scalar.yaml", "SECRET-MARK plain text\n"),
    ("keys.yaml", "SECRET-MARK: 1\nnodes: 3\n"),                           # keys that are no config key
], ids=["not yaml", "passwd as yaml", "yaml error", "scalar", "odd keys"])
def test_an_error_about_a_preset_never_prints_the_file(tmp_path, preset, content):
    path = tmp_path / preset
    path.write_text(content)
    with pytest.raises(ConfigError, match=f"preset '?{path}") as info:
        DecaConfig.from_run_config({"preset": str(path)})
    assert "SECRET" not in str(info.value)
    if preset == "keys.yaml":  # a key close to a config key is still named: it is the likely typo
        assert "unknown keys: 'nodes' (did you mean 'num-nodes'?), 1 not shown" in str(info.value)


def test_the_system_password_file_is_not_a_preset():
    with pytest.raises(ConfigError, match="is not a YAML file") as info:
        DecaConfig.from_run_config({"preset": "../../../../../../etc/passwd"})
    assert "root" not in str(info.value)


@pytest.mark.parametrize(("labels", "task", "message"), [
    ("a,b,a", "classify", r"labels lists \['a'\] more than once"),
    ("sport", "classify", "names 1 class"),
    (" , ", "classify", "names 0 class"),
    ("a,b", "instruct", "labels is for task='classify'"),
])
def test_bad_labels_are_refused(labels, task, message):
    dataset = "chatterbot-english" if task == "instruct" else "bbc-news"
    with pytest.raises(ConfigError, match=message):
        DecaConfig(labels=labels, task=task, dataset=dataset)
