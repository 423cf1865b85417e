"""What each method trains, as blocks for the same DecaNode machinery.

- deca / deca-nobma / deca-trivial: blocks of k layers, one active at a time, R steps per visit.
- dadam:  ONE block holding every parameter (full Adam, moments kept for B*R steps), gossip of the
          whole model after every step: what DECA saves memory and bytes against.
- declora: LoRA adapters injected with peft into the attention and MLP projections; ONE block of
          adapter A/B matrices, gossiped with the same W; the base weights stay frozen.
- fedavg: one block of every parameter trained for R local steps per round; Flower's FedAvg
          strategy averages on the server (deca_flower/flower/fedavg.py).
Equal local steps: every method runs T * B * R local steps per node (B = DECA's block count).
"""

from __future__ import annotations

import torch
from torch import nn

from deca_flower.config import DecaConfig
from deca_flower.core.blocks import Block, partition_blocks

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_lora(model: nn.Module, cfg: DecaConfig) -> nn.Module:
    """Inject LoRA layers in place (the model stays a plain transformers CausalLM)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # every node (and the reference) starts from the same adapters
        return inject_adapter_in_model(config, model)


def method_blocks(model: nn.Module, cfg: DecaConfig) -> tuple[list[Block], int]:
    """(blocks, local steps per block visit) for the configured method."""
    deca_blocks = partition_blocks(model, cfg.layers_per_block, cfg.embeddings)
    if cfg.method.startswith("deca"):
        return deca_blocks, cfg.steps_per_block
    steps = cfg.steps_per_block * len(deca_blocks)
    if cfg.method == "declora":
        names = tuple(n for n, _ in model.named_parameters() if "lora_" in n)
        return [Block(0, "lora", names)], steps
    return [Block(0, "all", tuple(n for n, _ in model.named_parameters()))], steps
