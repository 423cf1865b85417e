"""Predict a run's memory per node, bytes on the wire and message count before anything runs.

    deca-flower plan --model smollm2-135m-instruct --layers-per-block 2 --nodes 4 --topology erdos_renyi

The model is built on the meta device from its config (no weights are loaded). Accounting,
for P parameters, the active block's b parameters, w bytes per weight (4 on CPU, 2 in bf16):
    DECA optimizer + grads  = b * (4 fp32 grad + 8 Adam moments [+ 4 fp32 master if bf16]
                                   [+ 8 moment copies for bma=trivial]); BMA keeps no theta copy
    full Adam               = P * (4 fp32 grad + 8 moments [+ 4 fp32 master if bf16])
    bytes per exchange      = the packed record of the half-step block (b * w and its manifest)
                              * degree (each neighbour gets it once): what the relay counts
    compressed gossip       = per visit, one int8 payload and R - 1 of the codec (compression.py's
                              layout: scales, indices, headers; packed as the relay counts them),
                              times the degree; public copies: (max degree + 1) * b * 4 (fp32
                              copies of the largest block). Not counted: the transients of one
                              tensor at a time while publishing and decoding: its fp32 difference
                              to the own copy (largest tensor x 4), int4 unpacking (x 3 more)
    FedAvg                  = 2 * P * 4 per round (model down and up, fp32: ArrayRecord has no bf16),
                              T * B rounds of R steps
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from deca_flower.config import DecaConfig
from deca_flower.core.blocks import Block, partition_blocks
from deca_flower.core.choco import ChocoSettings
from deca_flower.core.compression import Codec
from deca_flower.core.topology import build_graph
from deca_flower.protocol.packing import packed_size
from deca_flower.protocol.tensors import payload_wire_bytes


@dataclass
class Plan:
    params: int
    weight_bytes: int
    num_blocks: int
    largest_block_params: int
    deca_optimizer_bytes: int
    full_adam_optimizer_bytes: int
    deca_peak_bytes: int
    full_adam_peak_bytes: int
    mean_degree: float
    bytes_per_exchange_mean: float
    bytes_per_node_run: float
    fedavg_bytes_per_node_run: float
    train_messages: int
    uncompressed_bytes_per_node_run: float  # = bytes_per_node_run without compression
    public_copy_bytes: int  # compressed gossip: the public copies of the busiest node (0 without)

    def as_dict(self) -> dict:
        return asdict(self)


def meta_model(name: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from deca_flower.models import TINY_MODEL, resolve_model_source, tiny_random_model

    if name == TINY_MODEL:
        return tiny_random_model(0)
    config = AutoConfig.from_pretrained(resolve_model_source(name))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def make_plan(cfg: DecaConfig, *, bf16: bool = False, model=None) -> Plan:
    model = model if model is not None else meta_model(cfg.model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    params = {n: math.prod(s) for n, s in shapes.items()}
    blocks = partition_blocks(model, cfg.layers_per_block, cfg.embeddings)
    sizes = [sum(params[n] for n in b.param_names) for b in blocks]
    total = sum(params.values())
    w = 2 if bf16 else 4
    master = 4 if bf16 else 0
    deca_opt = max(sizes) * (4 + 8 + master + (8 if cfg.effective_bma == "trivial" else 0))
    full_opt = total * (4 + 8 + master)
    graph = build_graph(cfg.topology, cfg.num_nodes, seed=cfg.seed, edge_prob=cfg.edge_prob)
    degree = 2 * graph.number_of_edges() / cfg.num_nodes
    steps_per_visit = cfg.steps_per_block
    wire_dtype = "bfloat16" if bf16 else "float32"
    uncompressed_visit = [packed_size([(n, wire_dtype, shapes[n]) for n in b.param_names]) * steps_per_visit
                          for b in blocks]
    sent_visit, copies = uncompressed_visit, 0
    if cfg.compression != "none":
        choco = ChocoSettings(Codec(cfg.compression, cfg.compression_chunk))
        first, later = choco.codec_at(0), choco.codec  # a visit's first payload is int8
        sent_visit = [_payload_bytes(first, b, shapes) + (steps_per_visit - 1) * _payload_bytes(later, b, shapes)
                      for b in blocks]
        copies = (max(d for _, d in graph.degree()) + 1) * max(sizes) * 4
    visits = len(blocks) * cfg.rounds
    return Plan(
        params=total, weight_bytes=total * w, num_blocks=len(blocks), largest_block_params=max(sizes),
        deca_optimizer_bytes=deca_opt, full_adam_optimizer_bytes=full_opt,
        deca_peak_bytes=total * w + deca_opt + copies, full_adam_peak_bytes=total * w + full_opt,
        mean_degree=degree, bytes_per_exchange_mean=sum(sent_visit) / len(sent_visit) / steps_per_visit * degree,
        bytes_per_node_run=cfg.rounds * sum(sent_visit) * degree,
        fedavg_bytes_per_node_run=2.0 * total * 4 * cfg.rounds * len(blocks),  # T*B rounds of R steps
        train_messages=cfg.num_nodes * visits * steps_per_visit,
        uncompressed_bytes_per_node_run=cfg.rounds * sum(uncompressed_visit) * degree, public_copy_bytes=copies,
    )


def _payload_bytes(codec: Codec, block: Block, shapes: dict[str, tuple[int, ...]]) -> int:
    return payload_wire_bytes(codec, {n: shapes[n] for n in block.param_names})


def format_plan(plan: Plan) -> str:
    gib = 1024**3
    mib = 1024**2
    return "\n".join([
        f"parameters            {plan.params:,} in {plan.num_blocks} blocks (largest {plan.largest_block_params:,})",
        f"weights               {plan.weight_bytes / gib:.3f} GiB per node",
        f"optimizer+grads       DECA {plan.deca_optimizer_bytes / mib:.1f} MiB vs full Adam "
        f"{plan.full_adam_optimizer_bytes / mib:.1f} MiB ({plan.full_adam_optimizer_bytes / plan.deca_optimizer_bytes:.1f}x)",
        *([f"public copies         {plan.public_copy_bytes / mib:.1f} MiB (compressed gossip: degree + 1 fp32 copies "
           "of the largest block)"] if plan.public_copy_bytes else []),
        f"peak (weights+opt)    DECA {plan.deca_peak_bytes / gib:.3f} GiB vs full Adam {plan.full_adam_peak_bytes / gib:.3f} GiB",
        f"mean degree           {plan.mean_degree:.2f}",
        f"bytes per exchange    {plan.bytes_per_exchange_mean / mib:.1f} MiB per node (block bytes x degree, mean over steps)",
        f"bytes per node, run   {plan.bytes_per_node_run / gib:.3f} GiB "
        f"(FedAvg at equal local steps: {plan.fedavg_bytes_per_node_run / gib:.3f} GiB)",
        *([f"compression           {plan.uncompressed_bytes_per_node_run / plan.bytes_per_node_run:.2f}x fewer bytes than "
           f"uncompressed ({plan.uncompressed_bytes_per_node_run / gib:.3f} GiB)"] if plan.public_copy_bytes else []),
        f"train messages        {plan.train_messages:,}",
    ])
