"""One typed run configuration, filled from Flower's run-config, presets and overrides.

Precedence (lowest first): the dataclass defaults below (mirrored one-to-one in
pyproject.toml's [tool.flwr.app.config]) <- a preset YAML from conf/ (key ``preset``)
<- run-config values that differ from their pyproject default (``--run-config``).
Keys use Flower's hyphenated spelling (``layers-per-block``); fields use underscores.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

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
    """classify: comma-separated class names in a fixed order ("" = the sorted labels found in the data).
    Set it when sites train on their own files (node-config data-path), so that all agree."""
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
    """Run folder name ("" = method-topology-timestamp)."""
    node_wait_s: float = 60.0
    """How long the coordinator waits for num-nodes SuperNodes to connect."""
    reply_timeout_s: float = 3600.0
    """How long the coordinator waits for the replies to one message round."""
    rejoin_probe_s: float = 30.0
    """At each block boundary, how long to wait for a dropped node that may be back (0 = no rejoin)."""
    resume: bool = False
    """Continue the run named run-name from its last block-boundary checkpoint."""

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


def _load_preset(preset: str) -> Any:
    """A preset is a YAML file: a path, or a name under conf/ or conf/experiments/."""
    candidates = [Path(preset)]
    for folder in (CONF_DIR, CONF_DIR / "experiments", Path.cwd() / "conf"):
        candidates += [folder / f"{preset}.yaml", folder / preset]
    for path in candidates:
        if path.is_file():
            node = OmegaConf.load(path)
            unknown = [k for k in node if str(k).replace("-", "_") not in _defaults_node(DecaConfig)]
            if unknown:
                raise ConfigError(f"preset {path} has unknown keys: {unknown}")
            return OmegaConf.create({str(k).replace("-", "_"): v for k, v in node.items()})
    raise ConfigError(f"preset '{preset}' not found (looked in {CONF_DIR} and its experiments/)")


def _type_problems(cfg: DecaConfig) -> list[str]:
    """Values of the wrong type (run-config strings such as resume='false' are truthy), or not finite."""
    out = []
    for f in fields(cfg):
        key, value = f.name.replace("_", "-"), getattr(cfg, f.name)
        if f.type == "bool" and not isinstance(value, bool):
            out.append(f"{key} must be true or false, got {value!r}")
        elif f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            out.append(f"{key} must be an integer, got {value!r}")
        elif f.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            out.append(f"{key} must be a number, got {value!r}")
        elif f.type == "float" and not math.isfinite(value):
            out.append(f"{key} must be finite, got {value!r}")
        elif f.type == "str" and not isinstance(value, str):
            out.append(f"{key} must be a string, got {value!r}")
    return out


def _problems(cfg: DecaConfig) -> list[str]:
    """Every invalid value, one message each; no model or data is touched."""
    out = _type_problems(cfg)
    if out:  # the range checks below compare numbers
        return out

    def choice(name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(cfg, name)
        if value not in allowed:
            out.append(f"{name.replace('_', '-')}='{value}' is not one of {list(allowed)}")

    def positive(name: str, *, allow_zero: bool = False) -> None:
        value = getattr(cfg, name)
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            out.append(f"{name.replace('_', '-')} must be {bound}, got {value}")

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
    for name in ("num_nodes", "rounds", "layers_per_block", "steps_per_block", "batch_size",
                 "max_text_tokens", "eval_batch_size", "alpha", "eps", "node_wait_s", "lora_rank", "lora_alpha",
                 "reply_timeout_s", "shards_per_node", "max_response_tokens"):
        positive(name)
    positive("lr", allow_zero=True)  # lr = 0 is the gossip-only check of the tests
    for name in ("eval_samples", "eval_every_blocks", "max_block_deviation", "rejoin_probe_s", "samples", "bma_strength"):
        positive(name, allow_zero=True)
    for name in ("beta1", "beta2", "bma_beta1", "bma_beta2"):
        value = getattr(cfg, name)
        if not 0.0 <= value < 1.0:
            out.append(f"{name.replace('_', '-')} must be in [0, 1), got {value}")
    if not 0.0 < cfg.edge_prob <= 1.0:
        out.append(f"edge-prob must be in (0, 1], got {cfg.edge_prob}")
    if not 0.0 < cfg.test_fraction < 1.0:
        out.append(f"test-fraction must be in (0, 1), got {cfg.test_fraction}")
    if cfg.num_nodes < 2 and not out:
        out.append(f"num-nodes must be >= 2 for gossip, got {cfg.num_nodes}")
    if not out and cfg.method != "fedavg":  # before any node connects: e.g. a torus of 4 or a ring of 2
        try:
            build_graph(cfg.topology, cfg.num_nodes, seed=cfg.seed, edge_prob=cfg.edge_prob)
        except TopologyError as err:
            out.append(f"topology='{cfg.topology}' with num-nodes={cfg.num_nodes}: {err}")
    if not cfg.model:
        out.append("model is empty: give the embedded default, a hub id or a local path")
    elif cfg.model.startswith(("/", ".", "~")) and not Path(cfg.model).expanduser().exists():
        out.append(f"model path '{cfg.model}' does not exist")
    if cfg.secure_gossip and not Path(cfg.trusted_keys).expanduser().is_file():
        out.append(f"secure-gossip needs trusted-keys (a JSON file of site public keys); got '{cfg.trusted_keys}'")
    if cfg.dataset.endswith((".jsonl", ".json", ".csv")) and not Path(cfg.dataset).expanduser().is_file():
        out.append(f"dataset file '{cfg.dataset}' does not exist")
    if cfg.discrepancy in DIVIDES_BY_LR and cfg.lr == 0 and cfg.effective_bma != "none":
        out.append(f"discrepancy='{cfg.discrepancy}' divides by lr: lr=0 needs bma='none'")
    if cfg.task == "instruct" and cfg.dataset == "bbc-news":
        out.append("task='instruct' needs instruction data: dataset='chatterbot-english' (embedded), a hub id such as "
                   "'tatsu-lab/alpaca', or a .jsonl/.csv with instruction and response columns")
    if cfg.resume and not cfg.run_name:
        out.append("resume=true needs run-name: the name of the run folder to continue")
    if cfg.resume and cfg.method == "fedavg":
        out.append("resume=true is for the gossip methods; method='fedavg' runs Flower's FedAvg strategy")
    return out
