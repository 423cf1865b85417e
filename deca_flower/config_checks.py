"""Validation of a DecaConfig: every invalid value, one message each, before any model or data is
touched or any node connects. Also the allowed values of the choice fields."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any

from deca_flower.core.conventions import BMA_MODES, COMPRESSIONS, DISCREPANCIES, DIVIDES_BY_LR
from deca_flower.core.topology import TOPOLOGIES, TopologyError, build_graph


class ConfigError(ValueError):
    """A run configuration value is invalid; the message names the key."""


METHODS = ("deca", "deca-nobma", "deca-trivial", "fedavg", "dadam", "declora")
# the paper's ablation: the method name fixes the moment approximation
METHOD_BMA = {"deca-nobma": "none", "deca-trivial": "trivial", "dadam": "none", "declora": "none", "fedavg": "none"}
PARTITIONERS = ("dirichlet", "iid", "shard")
BLOCK_ORDERS = ("ascending", "descending", "random")
EMBEDDING_MODES = ("block", "frozen")
DEVICES = ("auto", "cpu", "cuda")
STATE_SYNC = ("block", "step")
TASKS = ("classify", "instruct")
# the choice fields and their allowed values (validated below, listed in docs/configuration.md)
CHOICES = {"method": METHODS, "topology": TOPOLOGIES, "partitioner": PARTITIONERS, "bma": BMA_MODES,
           "discrepancy": DISCREPANCIES, "block_order": BLOCK_ORDERS, "embeddings": EMBEDDING_MODES, "device": DEVICES,
           "state_sync": STATE_SYNC, "task": TASKS, "on_bad_block": ("stop", "exclude"),
           "on_disconnect": ("stop", "components"), "compression": COMPRESSIONS}
HEADLINE = {"classify": ("accuracy", "macro_f1"), "instruct": ("response_loss", "perplexity")}  # per task

SEED_RANGE = (0, 2**32 - 1)  # numpy's legacy and torch's generators both take this range


def _type_problems(cfg: Any) -> dict[str, str]:
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


def problems(cfg: Any) -> list[str]:
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

    for name, allowed in CHOICES.items():
        choice(name, allowed)
    for name in ("rounds", "layers_per_block", "steps_per_block", "batch_size",
                 "max_text_tokens", "eval_batch_size", "alpha", "eps", "node_wait_s", "lora_rank", "lora_alpha",
                 "reply_timeout_s", "shards_per_node", "max_response_tokens"):
        positive(name)
    positive("lr", allow_zero=True)  # lr = 0 is the gossip-only check of the tests
    for name in ("eval_samples", "eval_every_blocks", "max_block_deviation", "rejoin_probe_s", "disconnect_wait_s",
                 "samples", "bma_strength", "compression_chunk"):
        positive(name, allow_zero=True)
    for name in ("beta1", "beta2", "bma_beta1", "bma_beta2"):
        value = getattr(cfg, name)
        if ok(name) and not 0.0 <= value < 1.0:
            refuse(name, f"{name.replace('_', '-')} must be in [0, 1), got {value}")
    if ok("consensus_step_size") and not 0.0 <= cfg.consensus_step_size <= 1.0:
        refuse("consensus_step_size", f"consensus-step-size must be in [0, 1] (0 = the codec's), got {cfg.consensus_step_size}")
    if ok("compression") and cfg.compression == "topk":
        refuse("compression", "compression='topk' makes the nodes drift apart within a visit: a tenth of the entries per "
               "step cannot clear the error of the visit's first (int8) payload, and the Adam steps move every entry "
               "(bench/compression_visit.py, bench/RESULTS.md); use int8 or int4")
    if ok("compression", "method") and cfg.compression != "none" and cfg.method == "fedavg":
        out.append(f"compression='{cfg.compression}' compresses gossip; method='fedavg' sends models to Flower's "
                   "FedAvg strategy uncompressed")
    if ok("compression", "consensus_step_size") and cfg.compression == "none" and cfg.consensus_step_size:
        out.append(f"consensus-step-size={cfg.consensus_step_size} is for compressed gossip; compression='none' mixes "
                   "with the weights W as they are (set compression, or leave consensus-step-size at 0)")
    if ok("compression", "steps_per_block") and cfg.compression != "none" and cfg.steps_per_block < 2:
        out.append(f"compression='{cfg.compression}' needs steps-per-block >= 2, got {cfg.steps_per_block}: the first "
                   "exchange of a visit only fills the public copies, so with one step per visit no node would ever mix")
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
