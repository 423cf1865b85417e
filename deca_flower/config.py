"""One typed run configuration, filled from Flower's run-config, presets and overrides.

Precedence (lowest first): the dataclass defaults below (mirrored one-to-one in
pyproject.toml's [tool.flwr.app.config]) <- a preset YAML from conf/ (key ``preset``)
<- run-config values that differ from their pyproject default (``--run-config``).
Keys use Flower's hyphenated spelling (``layers-per-block``); fields use underscores.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import OmegaConf

from deca_flower.config_checks import HEADLINE, METHOD_BMA, ConfigError, label_names, problems  # noqa: F401 (re-exported)
from deca_flower.presets import load_preset

log = logging.getLogger(__name__)


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
    """Communication graph between the nodes; the mixing weights W are Metropolis-Hastings over it."""
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
    """Adam's first-moment decay (a1 in docs/algorithm.md)."""
    beta2: float = 0.999
    """Adam's second-moment decay (a2 in docs/algorithm.md)."""
    eps: float = 1e-8
    """Adam epsilon."""
    bma: str = "full"
    """Block-wise moment approximation: full, none (no BMA) or trivial."""
    lora_rank: int = 8
    """Dec-LoRA adapter rank (method declora)."""
    lora_alpha: float = 16.0
    """Dec-LoRA scaling alpha."""
    on_bad_block: str = "stop"
    """A neighbour block that fails validation: stop the run, or exclude it for this step and go on (with
    compression: for the rest of the visit, while the sender still mixes with this node, so the network
    average is not kept until the next block)."""
    secure_gossip: bool = False
    """Encrypt and authenticate blocks per neighbour pair (X25519 + AES-GCM): the relay sees ciphertext."""
    trusted_keys: str = ""
    """secure-gossip: JSON {partition id: Ed25519 public key hex} of every site (distributed out of band)."""
    identity_key_dir: str = ""
    """secure-gossip demo: folder with node_<id>.pem identities (a SuperNode's node-config 'identity-key' wins)."""
    on_disconnect: str = "stop"
    """When dropped nodes split the graph: stop (after disconnect-wait-s), or go on gossiping within each component."""
    max_block_deviation: float = 0.5
    """Refuse a neighbour block farther than this times the norm of the node's own block (0 = off)."""
    bma_beta1: float = 0.9
    """b1: weight of the old first moment when folding in the consensus signal."""
    bma_beta2: float = 0.999
    """b2: weight of the old second moment when folding in the consensus signal."""
    discrepancy: str = "gradient"
    """Units of the consensus signal h (d = theta - mixed): scaled=d/lr, raw=-d, normalized=d/||d||,
    gradient=the gradient that moves Adam from theta to mixed (core/optimizer.py). The default and
    bma-strength's come from results/bma-study/."""
    bma_strength: float = 10.0
    """s: weight of the consensus part (half - mixed) of d; 0 = no consensus signal, 1 = d itself. With
    discrepancy=gradient the next step repeats about (1 - bma-beta1) * s of the last gossip correction."""
    compression: str = "none"
    """What a node sends each step: none (its block as it is), or with CHOCO-gossip error feedback
    (core/choco.py) int8 or int4 (per-chunk scales) of the change of its public copy; a visit's first
    payload is always int8. topk (the largest entries) is refused: its nodes drift apart within a visit."""
    compression_chunk: int = 64
    """int8/int4 (and every first, int8, payload of a visit): elements per scale; 0 = one scale per row."""
    consensus_step_size: float = 0.0
    """gamma in [0, 1] of compressed gossip, theta = half + gamma * sum_j W_ij (copy_j - own copy); 0 = the
    codec's stable one (1 for int8 and int4). Only with
    compression: uncompressed gossip mixes with W itself (a non-zero value with compression='none' is refused)."""
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
    disconnect_wait_s: float = 300.0
    """on-disconnect='stop': how long to hold at the block boundary after dropouts split the graph, probing
    for the dropped nodes to rejoin, before the run stops (0 = stop at once; needs rejoin-probe-s > 0)."""
    resume: bool = False
    """Continue the run named run-name from its last block-boundary checkpoint."""
    overwrite: bool = False
    """Start afresh in a run folder that holds an earlier run's checkpoint or summary (its files move to
    <run>/previous/ once training starts); without it such a start is refused."""

    def __post_init__(self) -> None:
        errors = problems(self)
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
            preset_values = load_preset(preset, list(_defaults_node(cls)))
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


