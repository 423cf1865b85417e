"""Build one node's working set from a DecaConfig: device, model, data partition, task, DecaNode.

Shared by the single-process reference runner and the Flower ClientApp, so both train the
same model on the same minibatches for the same seed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from deca_flower.config import DecaConfig, label_names
from deca_flower.core.blocks import Block
from deca_flower.core.choco import ChocoSettings, default_gamma
from deca_flower.core.compression import Codec
from deca_flower.core.node import AdamSettings, BatchSampler, DecaNode
from deca_flower.data.instructions import load_instructions
from deca_flower.data.partition import node_partition, train_test
from deca_flower.data.sources import load_corpus
from deca_flower.data.splits import partitioner_for, split_data
from deca_flower.instruct import EncodedPairs, InstructionTask
from deca_flower.methods import add_lora, method_blocks
from deca_flower.models import load_model
from deca_flower.task import ClassificationTask, Encoded

Task = ClassificationTask | InstructionTask

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA GPU is visible")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def node_data(cfg: DecaConfig, partition_id: int, data_path: str | None = None) -> tuple[Dataset, Dataset, list[str]]:
    """(train, held-out, label names) of one node: its share of the demo split, or, with a
    data-path from its node-config, its own file (split into train and held-out locally)."""
    if data_path:
        corpus = load_instructions(data_path) if cfg.task == "instruct" else load_corpus(data_path, label_names(cfg.labels))
        train, test = train_test(corpus, cfg.test_fraction, cfg.seed)
        return train, test, train.features["label"].names
    train, test = split_data(cfg.dataset, cfg.task, cfg.test_fraction, cfg.seed, tuple(label_names(cfg.labels)))
    return node_partition(partitioner_for(cfg), partition_id), test, train.features["label"].names


def eval_subset(test: Dataset, samples: int, seed: int) -> Dataset:
    """The same held-out examples for every node: a seeded sample of the test split."""
    if samples == 0 or samples >= len(test):
        return test
    order = np.random.default_rng(seed).permutation(len(test))[:samples]
    return test.select(sorted(int(i) for i in order))


@dataclass
class NodeRuntime:
    """Everything one node keeps between messages."""

    cfg: DecaConfig
    partition_id: int
    device: torch.device
    task: Task
    train: Encoded | EncodedPairs
    test: Encoded | EncodedPairs
    node: DecaNode
    label_counts: list[int]
    steps_per_visit: int
    label_names: list[str]
    data_path: str  # "" = its share of the demo split
    generation: int = 0  # messages processed; see flower/state.py
    excluded_last_step: list[str] = field(default_factory=list)  # refused neighbour blocks, reported once
    channel: Any = None  # secure.PairwiseChannel when secure-gossip is on

    @property
    def blocks(self) -> list[Block]:
        return self.node.blocks

    def evaluate(self) -> dict[str, float]:
        return self.task.evaluate(self.node.model, self.test, self.cfg.eval_batch_size, self.device)

    def samples(self) -> list[tuple[str, str]]:
        """(prompt, greedy answer) for the first cfg.samples held-out prompts (instruct only)."""
        if not isinstance(self.task, InstructionTask) or not self.cfg.samples:
            return []
        answers = self.task.samples(self.node.model, self.test, self.cfg.samples, self.device)
        return [(self.task.prompt_text(self.test, i), a) for i, a in enumerate(answers)]


def choco_settings(cfg: DecaConfig) -> ChocoSettings | None:
    """Compressed gossip's settings, or None for compression='none'."""
    if cfg.compression == "none":
        return None
    codec = Codec(cfg.compression, cfg.compression_chunk)
    return ChocoSettings(codec, cfg.consensus_step_size or default_gamma(codec))


def build_runtime(cfg: DecaConfig, partition_id: int, device: torch.device | None = None,
                  data_path: str | None = None) -> NodeRuntime:
    start = time.time()
    device = device or resolve_device(cfg.device)
    part, test_split, label_names = node_data(cfg, partition_id, data_path)
    model, tokenizer = load_model(cfg.model, device, seed=cfg.seed)
    task: Task = (InstructionTask(tokenizer, cfg.max_text_tokens, cfg.max_response_tokens) if cfg.task == "instruct"
                  else ClassificationTask(tokenizer, label_names, cfg.max_text_tokens))
    train = task.encode_dataset(part)
    test = task.encode_dataset(eval_subset(test_split, cfg.eval_samples, cfg.seed))
    if cfg.method == "declora":
        model = add_lora(model, cfg).to(device)
    blocks, steps_per_visit = method_blocks(model, cfg)
    settings = AdamSettings(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, bma=cfg.effective_bma,
                            bma_betas=(cfg.bma_beta1, cfg.bma_beta2), discrepancy=cfg.discrepancy,
                            strength=cfg.bma_strength)
    sampler = BatchSampler(len(train), cfg.batch_size, cfg.seed, partition_id)
    node = DecaNode(model, blocks, settings, sampler,
                    make_batch=lambda idx: task.collate(train, idx, device), loss_fn=task.loss, choco=choco_settings(cfg))
    counts = np.bincount(train.labels, minlength=len(label_names)).tolist()
    log.info("node %d ready on %s (%d torch threads) in %.1fs: %d train examples %s, %d blocks",
             partition_id, device, torch.get_num_threads(), time.time() - start, len(train), counts, len(blocks))
    return NodeRuntime(cfg, partition_id, device, task, train, test, node, counts, steps_per_visit, label_names,
                       data_path or "")
