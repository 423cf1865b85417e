"""The demo data set split into train and held-out parts, and the partitioner that shares the
train part out to the nodes. Without torch: the ServerApp plots the partition from it too."""

from __future__ import annotations

import functools
from pathlib import Path

from datasets import Dataset
from flwr_datasets.partitioner import Partitioner

from deca_flower.config import DecaConfig, label_names
from deca_flower.data.instructions import load_instructions
from deca_flower.data.partition import build_partitioner, train_test
from deca_flower.data.sources import load_corpus


def split_data(dataset: str, task: str, test_fraction: float, seed: int,
               labels: tuple[str, ...] = ()) -> tuple[Dataset, Dataset]:
    """(train, held-out) of a whole data set; classify: classes in the order of `labels` ("" = sorted)."""
    return _split_data(dataset, _local_version(dataset), task, test_fraction, seed, labels)


@functools.lru_cache(maxsize=4)
def _split_data(dataset: str, version: tuple, task: str, test_fraction: float, seed: int,
                labels: tuple[str, ...]) -> tuple[Dataset, Dataset]:
    corpus = load_instructions(dataset) if task == "instruct" else load_corpus(dataset, list(labels))
    return train_test(corpus, test_fraction, seed)


def _local_version(dataset: str) -> tuple:
    """Names, sizes and mtimes of a local data file or folder (empty for a packaged or hub data set):
    warm processes outlive runs, and a file edited between two runs must not come from the cache."""
    path = Path(dataset)
    if not path.exists():
        return ()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files)


def partitioner_for(cfg: DecaConfig) -> Partitioner:
    train, _ = split_data(cfg.dataset, cfg.task, cfg.test_fraction, cfg.seed, tuple(label_names(cfg.labels)))
    return build_partitioner(train, cfg.partitioner, cfg.num_nodes, alpha=cfg.alpha,
                             shards_per_node=cfg.shards_per_node, seed=cfg.seed)
