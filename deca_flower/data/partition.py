"""Held-out test split and the non-IID partition of the training split (flwr-datasets)."""

from __future__ import annotations

import warnings

from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner, ShardPartitioner

from deca_flower.data.sources import DataError


def train_test(corpus: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Stratified split (plain when a class is too rare to stratify); the test part is never trained on."""
    try:
        split = corpus.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column="label")
    except ValueError:
        split = corpus.train_test_split(test_size=test_fraction, seed=seed)
    return split["train"], split["test"]


def build_partitioner(train: Dataset, kind: str, num_partitions: int, *, alpha: float,
                      shards_per_node: int, seed: int) -> Partitioner:
    if num_partitions > len(train):
        raise DataError(f"{num_partitions} nodes but only {len(train)} training examples")
    min_size = max(1, min(10, len(train) // (2 * num_partitions)))  # dirichlet: examples each node gets at least
    if kind == "dirichlet":
        partitioner: Partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha, seed=seed, min_partition_size=min_size,
        )
    elif kind == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif kind == "shard":
        if num_partitions * shards_per_node > len(train):
            raise DataError(f"{num_partitions} nodes x shards-per-node={shards_per_node} shards but only "
                            f"{len(train)} training examples: lower shards-per-node")
        partitioner = ShardPartitioner(
            num_partitions=num_partitions, partition_by="label",
            num_shards_per_partition=shards_per_node, seed=seed,
        )
    else:
        raise DataError(f"unknown partitioner '{kind}'")
    partitioner.dataset = train
    try:  # draw the whole split now (it is drawn once, from the seed): a split that cannot be made fails here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # flwr-datasets warns per failed draw, listing every alpha
            partitioner.load_partition(0)
    except ValueError as err:
        if kind == "dirichlet":
            raise DataError(f"the dirichlet split (alpha={alpha}) found no way to give each of {num_partitions} nodes at "
                            f"least {min_size} of the {len(train)} training examples: use fewer "
                            "nodes, a larger alpha, or partitioner='iid'") from None
        raise DataError(f"cannot split {len(train)} training examples over {num_partitions} nodes with "
                        f"partitioner='{kind}': {err}") from None
    return partitioner


def node_partition(partitioner: Partitioner, partition_id: int) -> Dataset:
    if not 0 <= partition_id < partitioner.num_partitions:
        raise DataError(f"partition-id {partition_id} outside 0..{partitioner.num_partitions - 1}")
    part = partitioner.load_partition(partition_id)
    if len(part) == 0:
        raise DataError(f"partition {partition_id} is empty")
    return part
