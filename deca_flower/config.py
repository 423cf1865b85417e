"""One typed run configuration, filled from Flower's run-config, presets and overrides.

Precedence (lowest first): the dataclass defaults below (mirrored one-to-one in
pyproject.toml's [tool.flwr.app.config]) <- a preset YAML from conf/ (key ``preset``)
<- run-config values that differ from their pyproject default (``--run-config``).
Keys use Flower's hyphenated spelling (``layers-per-block``); fields use underscores.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from deca_flower.core.conventions import BMA_MODES, DISCREPANCIES, DIVIDES_BY_LR
from deca_flower.core.topology import TOPOLOGIES, TopologyError, build_graph

METHODS = ("deca", "deca-nobma", "deca-trivial", "fedavg", "dadam", "declora")
# the paper's ablation: the method name fixes the moment approximation
METHOD_BMA = {"deca-nobma": "none", "deca-trivial": "trivial", "dadam": "none", "declora": "none", "fedavg": "none"}
PARTITIONERS = ("dirichlet", "iid", "shard")
BLOCK_ORDERS = ("ascending", "descending", "random")
EMBEDDING_MODES = ("block", "frozen")
DEVICES = ("auto", "cpu", "cuda")
STATE_SYNC = ("block", "step")
TASKS = ("classify", "instruct")
HEADLINE = {"classify": ("accuracy", "macro_f1"), "instruct": ("response_loss", "perplexity")}  # per task

SEED_RANGE = (0, 2**32 - 1)  # numpy's legacy and torch's generators both take this range

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A run configuration value is invalid; the message names the key."""


@dataclass
class DecaConfig:
    """Everything a DECA run needs. Field names map to run-config keys (``_`` -> ``-``)."""

    preset: str = ""
    """Name of a conf/*.yaml (or conf/experiments/*.yaml) preset, or a path; "" for none."""
    method: str = "deca"
    """deca (bma as set), deca-nobma, deca-trivial, fedavg (Flower's FedAvg), dadam (whole-model gossip Adam), declora."""
    model: str = "smollm2-135m-instruct"
    """Embedded default, a Hugging Face hub id, a local model dir, or "tiny-random"."""
    task: str = "classify"
    """classify (text -> label, accuracy) or instruct (instruction -> response, perplexity + samples)."""
    dataset: str = "bbc-news"
    """classify: embedded "bbc-news", a local .jsonl/.csv with text+label, or a hub id. instruct: embedded
    "chatterbot-english", a local .jsonl/.csv with instruction+response, or a hub id such as tatsu-lab/alpaca."""
    labels: str = ""
    """classify: comma-separated class names in a fixed order ("" = the sorted labels found in the data),
    for every source; data may hold a subset of them, a label not listed is refused. Set it when sites
    train on their own files (node-config data-path), so that all agree."""
    num_nodes: int = 4
    """Number of clients (SuperNodes) taking part."""
    topology: str = "erdos_renyi"
    """Communication graph."""
    edge_prob: float = 0.5
    """Edge probability of the Erdos-Renyi graph (re-drawn until connected)."""
    partitioner: str = "dirichlet"
    """How the training split is cut across nodes."""
    alpha: float = 0.25
    """Dirichlet concentration (smaller = more non-IID)."""
    shards_per_node: int = 2
    """Shards per node for the shard partitioner."""
    test_fraction: float = 0.2
    """Held-out fraction of the data set used for evaluation only."""
    rounds: int = 1
    """T: passes over all blocks."""
    layers_per_block: int = 2
    """k: consecutive decoder layers per block."""
    steps_per_block: int = 8
    """R: local Adam steps (each followed by gossip) per block visit."""
    block_order: str = "descending"
    """Order of block visits within a round (descending: top layers first, the fastest gain measured)."""
    embeddings: str = "block"
    """Input embeddings and the lm_head (tied or not): their own blocks, or frozen."""
    lr: float = 1e-4
    """Adam learning rate."""
    beta1: float = 0.9
    """Adam a1."""
    beta2: float = 0.999
    """Adam a2."""
    eps: float = 1e-8
    """Adam epsilon."""
    bma: str = "full"
    """Block-wise moment approximation: full, none (no BMA) or trivial."""
    lora_rank: int = 8
    """Dec-LoRA adapter rank (method declora)."""
    lora_alpha: float = 16.0
    """Dec-LoRA scaling alpha."""
    on_bad_block: str = "stop"
    """A neighbour block that fails validation: stop the run, or exclude it for this step and go on."""
    secure_gossip: bool = False
    """Encrypt and authenticate blocks per neighbour pair (X25519 + AES-GCM): the relay sees ciphertext."""
    trusted_keys: str = ""
    """secure-gossip: JSON {partition id: Ed25519 public key hex} of every site (distributed out of band)."""
    identity_key_dir: str = ""
    """secure-gossip demo: folder with node_<id>.pem identities (a SuperNode's node-config 'identity-key' wins)."""
    on_disconnect: str = "stop"
    """When dropped nodes split the graph: stop, or go on gossiping within each component."""
    max_block_deviation: float = 0.5
    """Refuse a neighbour block farther than this times the norm of the node's own block (0 = off)."""
    bma_beta1: float = 0.9
    """b1: weight of the old first moment when folding in the consensus signal."""
    bma_beta2: float = 0.999
    """b2: weight of the old second moment when folding in the consensus signal."""
    discrepancy: str = "scaled"
    """Units of the consensus signal h (d = theta - mixed): scaled=d/lr, raw=-d, normalized=d/||d||,
    gradient=the gradient that moves Adam from theta to mixed (core/optimizer.py)."""
    bma_strength: float = 1.0
    """s: weight of the consensus part (half - mixed) of d; 0 = no consensus signal, 1 = d itself. With
    discrepancy=gradient the next step repeats about (1 - bma-beta1) * s of the last gossip correction."""
    batch_size: int = 4
    """Training examples per local step."""
    max_text_tokens: int = 64
    """Text is truncated to this many tokens inside the prompt."""
    max_response_tokens: int = 48
    """instruct: responses are truncated to this many tokens (plus end-of-sequence)."""
    samples: int = 3
    """instruct: held-out prompts each node answers (greedy) at the final evaluation."""
    eval_samples: int = 120
    """Held-out examples scored per evaluation (0 = the whole test split)."""
    eval_batch_size: int = 16
    """Examples per evaluation forward pass."""
    eval_every_blocks: int = 8
    """Evaluate after every this many block visits (0 = only at the end of each round)."""
    eval_initial: bool = True
    """Evaluate the untrained model before training."""
    seed: int = 0
    """Seed for graph, split, sampling and model init."""
    device: str = "auto"
    """auto = cuda when present (bf16 weights, fp32 master), else cpu (fp32)."""
    state_sync: str = "block"
    """Node state written to disk at block boundaries, or after every step (many actors)."""
    state_dir: str = ""
    """Where nodes keep their state ("" = <results-dir>/<run>/nodes)."""
    results_dir: str = "results/runs"
    """Parent directory of run folders (relative paths resolve against the app dir)."""
    run_name: str = ""
    """Run folder name, a plain name without path separators or '..' ("" = method-topology-timestamp)."""
    node_wait_s: float = 60.0
    """How long the coordinator waits for num-nodes SuperNodes to connect."""
    reply_timeout_s: float = 3600.0
    """How long the coordinator waits for the replies to one message round."""
    rejoin_probe_s: float = 30.0
    """At each block boundary, how long to wait for a dropped node that may be back (0 = no rejoin)."""
    resume: bool = False
    """Continue the run named run-name from its last block-boundary checkpoint."""
    overwrite: bool = False
    """Start afresh in a run folder that holds an earlier run's checkpoint or summary (its files move to
    <run>/previous/ once training starts); without it such a start is refused."""

    def __post_init__(self) -> None:
        errors = list(_problems(self))
        if errors:
            raise ConfigError("invalid DECA configuration:\n  - " + "\n  - ".join(errors))

    # -- conversion -------------------------------------------------------------

    def to_run_config(self) -> dict[str, Any]:
        """Flat dict with Flower's hyphenated keys (as sent to nodes and saved)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> DecaConfig:
        """Build from a Flower run-config (hyphenated keys), applying a preset if named."""
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown config key '{key}'")
            values[name] = value
        defaults = {f.name: f.default for f in fields(cls)}
        explicit = {k: v for k, v in values.items() if v != defaults[k]}
        preset = explicit.get("preset", "")
        layers = [OmegaConf.create(_defaults_node(cls))]
        if preset:
            preset_values = _load_preset(preset)
            layers.append(preset_values)
            hidden = {k: v for k, v in preset_values.items() if k not in explicit and v != defaults[k]}
            if hidden:  # Flower merges the app's defaults into run-config first: a default looks unset
                log.warning("preset '%s' sets %s; a run-config value equal to the app default cannot undo these",
                            preset, ", ".join(f"{k.replace('_', '-')}={v!r}" for k, v in hidden.items()))
        layers.append(OmegaConf.create(explicit))
        try:
            merged = OmegaConf.to_container(OmegaConf.merge(*layers), resolve=True)
        except Exception as err:  # omegaconf raises several types for bad values
            raise ConfigError(f"cannot merge config (preset '{preset}'): {err}") from err
        return cls(**merged)  # type: ignore[arg-type]

    @property
    def headline(self) -> tuple[str, str]:
        """The two held-out metrics that results report for this task."""
        return HEADLINE[self.task]

    @property
    def effective_bma(self) -> str:
        """The moment approximation the method actually uses."""
        return METHOD_BMA.get(self.method, self.bma)

    def replace(self, **changes: Any) -> DecaConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _defaults_node(cls: type[DecaConfig]) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls)}


PRESET_SUFFIXES = (".yaml", ".yml")


def _load_preset(preset: str) -> Any:
    """A preset is a YAML file: a path, or a name under conf/ or conf/experiments/.

    Only .yaml/.yml files are read, and no error quotes the file (a preset pointing at another file
    must not print it): YAML errors give the position, unknown keys are named only when they are close
    to a config key."""
    candidates = [Path(preset).expanduser()]
    for folder in (CONF_DIR, CONF_DIR / "experiments", Path.cwd() / "conf"):
        candidates += [folder / f"{preset}.yaml", folder / preset]
    found = [path for path in candidates if path.is_file()]
    path = next((p for p in found if p.suffix in PRESET_SUFFIXES), None)
    if path is None:
        if found:
            raise ConfigError(f"preset '{preset}' is not a YAML file (a preset ends in .yaml or .yml)")
        raise ConfigError(f"preset '{preset}' not found (looked in {CONF_DIR} and its experiments/)")
    try:
        node = OmegaConf.load(path)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"preset {path} is not valid YAML{where}") from None
    except Exception:  # omegaconf refuses a YAML scalar or a key of an unsupported type
        raise ConfigError(f"preset {path} is not a YAML mapping of config keys") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"preset {path} is not a YAML mapping of config keys")
    known = [name.replace("_", "-") for name in _defaults_node(DecaConfig)]
    unknown = [str(k) for k in node if str(k).replace("_", "-") not in known]
    if unknown:  # named only when close to a config key: the likely typo, not whatever the file holds
        named = {k: close[0] for k in unknown if (close := difflib.get_close_matches(k.replace("_", "-"), known, 1))}
        shown = [f"'{k}' (did you mean '{guess}'?)" for k, guess in named.items()]
        if len(named) < len(unknown):
            shown.append(f"{len(unknown) - len(named)} not shown (not close to a config key)")
        raise ConfigError(f"preset {path} has unknown keys: {', '.join(shown)}")
    return OmegaConf.create({str(k).replace("-", "_"): v for k, v in node.items()})


def _type_problems(cfg: DecaConfig) -> dict[str, str]:
    """{field: message} for values of the wrong type (run-config strings such as resume='false' are
    truthy), or not finite."""
    out = {}
    for f in fields(cfg):
        key, value = f.name.replace("_", "-"), getattr(cfg, f.name)
        if f.type == "bool" and not isinstance(value, bool):
            out[f.name] = f"{key} must be true or false, got {value!r}"
        elif f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            out[f.name] = f"{key} must be an integer, got {value!r}"
        elif f.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            out[f.name] = f"{key} must be a number, got {value!r}"
        elif f.type == "float" and not math.isfinite(value):
            out[f.name] = f"{key} must be finite, got {value!r}"
        elif f.type == "str" and not isinstance(value, str):
            out[f.name] = f"{key} must be a string, got {value!r}"
    return out


def _problems(cfg: DecaConfig) -> list[str]:
    """Every invalid value, one message each; no model or data is touched. A value of the wrong type
    is reported once; the checks of other values still run, those that need it are skipped."""
    mistyped = _type_problems(cfg)
    out = list(mistyped.values())
    bad: set[str] = set(mistyped)  # fields found invalid: later checks that read them are skipped

    def ok(*names: str) -> bool:
        return not bad.intersection(names)

    def refuse(name: str, message: str) -> None:
        out.append(message)
        bad.add(name)

    def choice(name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(cfg, name)
        if ok(name) and value not in allowed:
            refuse(name, f"{name.replace('_', '-')}='{value}' is not one of {list(allowed)}")

    def positive(name: str, *, allow_zero: bool = False) -> None:
        value = getattr(cfg, name)
        if ok(name) and (value < 0 or (value == 0 and not allow_zero)):
            bound = ">= 0" if allow_zero else "> 0"
            refuse(name, f"{name.replace('_', '-')} must be {bound}, got {value}")

    choice("method", METHODS)
    choice("topology", TOPOLOGIES)
    choice("partitioner", PARTITIONERS)
    choice("bma", BMA_MODES)
    choice("discrepancy", DISCREPANCIES)
    choice("block_order", BLOCK_ORDERS)
    choice("embeddings", EMBEDDING_MODES)
    choice("device", DEVICES)
    choice("state_sync", STATE_SYNC)
    choice("task", TASKS)
    choice("on_bad_block", ("stop", "exclude"))
    choice("on_disconnect", ("stop", "components"))
    for name in ("rounds", "layers_per_block", "steps_per_block", "batch_size",
                 "max_text_tokens", "eval_batch_size", "alpha", "eps", "node_wait_s", "lora_rank", "lora_alpha",
                 "reply_timeout_s", "shards_per_node", "max_response_tokens"):
        positive(name)
    positive("lr", allow_zero=True)  # lr = 0 is the gossip-only check of the tests
    for name in ("eval_samples", "eval_every_blocks", "max_block_deviation", "rejoin_probe_s", "samples", "bma_strength"):
        positive(name, allow_zero=True)
    for name in ("beta1", "beta2", "bma_beta1", "bma_beta2"):
        value = getattr(cfg, name)
        if ok(name) and not 0.0 <= value < 1.0:
            refuse(name, f"{name.replace('_', '-')} must be in [0, 1), got {value}")
    if ok("edge_prob") and not 0.0 < cfg.edge_prob <= 1.0:
        refuse("edge_prob", f"edge-prob must be in (0, 1], got {cfg.edge_prob}")
    if ok("test_fraction") and not 0.0 < cfg.test_fraction < 1.0:
        refuse("test_fraction", f"test-fraction must be in (0, 1), got {cfg.test_fraction}")
    if ok("seed") and not SEED_RANGE[0] <= cfg.seed <= SEED_RANGE[1]:
        refuse("seed", f"seed must be in [0, 2**32 - 1], got {cfg.seed}")
    if ok("num_nodes") and cfg.num_nodes < 2:
        refuse("num_nodes", f"num-nodes must be >= 2 for gossip, got {cfg.num_nodes}")
    if ok("method", "topology", "num_nodes", "seed", "edge_prob") and cfg.method != "fedavg":
        try:  # before any node connects: e.g. a torus of 4 or a ring of 2
            build_graph(cfg.topology, cfg.num_nodes, seed=cfg.seed, edge_prob=cfg.edge_prob)
        except TopologyError as err:
            out.append(f"topology='{cfg.topology}' with num-nodes={cfg.num_nodes}: {err}")
    if ok("model") and not cfg.model:
        out.append("model is empty: give the embedded default, a hub id or a local path")
    elif ok("model") and cfg.model.startswith(("/", ".", "~")) and not Path(cfg.model).expanduser().exists():
        out.append(f"model path '{cfg.model}' does not exist")
    if ok("secure_gossip", "trusted_keys") and cfg.secure_gossip and not Path(cfg.trusted_keys).expanduser().is_file():
        out.append(f"secure-gossip needs trusted-keys (a JSON file of site public keys); got '{cfg.trusted_keys}'")
    if ok("dataset") and cfg.dataset.endswith((".jsonl", ".json", ".csv")) and not Path(cfg.dataset).expanduser().is_file():
        out.append(f"dataset file '{cfg.dataset}' does not exist")
    if ok("discrepancy", "lr", "method", "bma") and cfg.discrepancy in DIVIDES_BY_LR and cfg.lr == 0 \
            and cfg.effective_bma != "none":
        out.append(f"discrepancy='{cfg.discrepancy}' divides by lr: lr=0 needs bma='none'")
    if ok("task", "dataset") and cfg.task == "instruct" and cfg.dataset == "bbc-news":
        out.append("task='instruct' needs instruction data: dataset='chatterbot-english' (embedded), a hub id such as "
                   "'tatsu-lab/alpaca', or a .jsonl/.csv with instruction and response columns")
    if ok("labels", "task"):
        out += _label_problems(cfg.labels, cfg.task)
    if ok("run_name"):
        out += _run_name_problems(cfg.run_name)
    if ok("resume", "run_name") and cfg.resume and not cfg.run_name:
        out.append("resume=true needs run-name: the name of the run folder to continue")
    if ok("resume", "method") and cfg.resume and cfg.method == "fedavg":
        out.append("resume=true is for the gossip methods; method='fedavg' runs Flower's FedAvg strategy")
    if ok("resume", "overwrite") and cfg.resume and cfg.overwrite:
        out.append("resume=true continues a run and overwrite=true starts it afresh: set one of them")
    return out


def _label_problems(labels: str, task: str) -> list[str]:
    if not labels:
        return []
    if task != "classify":
        return [f"labels is for task='classify' (task='{task}' splits data by its categories); got labels='{labels}'"]
    names = label_names(labels)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        return [f"labels lists {repeated} more than once"]
    if len(names) < 2:
        return [f"labels='{labels}' names {len(names)} class(es): classification needs at least 2"]
    return []


def label_names(labels: str) -> list[str]:
    """The class names of a `labels` value, in order ("a, b,c" -> ["a", "b", "c"]; "" -> [])."""
    return [name.strip() for name in labels.split(",") if name.strip()]


def _run_name_problems(name: str) -> list[str]:
    """A run name is one folder under results-dir: nothing that could reach outside it."""
    if not name:
        return []  # a name is made from method, topology and time
    if not name.strip() or name != name.strip():
        return [f"run-name {name!r} is blank or starts or ends with a space"]
    if "/" in name or "\\" in name or ".." in name or name == "." or any(ord(c) < 32 for c in name):
        return [f"run-name {name!r} must be a plain folder name: no '/', '\\', '..' or control characters"]
    return []
