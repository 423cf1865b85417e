"""Cut a causal LM into blocks of k consecutive decoder layers, and switch the active one.

A block is a list of parameter names. Decoder layers are found by their `...layers.N.` prefix
(Llama, Qwen, Mistral, GPT-NeoX style); the input embedding (and an lm_head tied to it, which
`named_parameters()` already yields once) is its own block or frozen; an untied lm_head is its
own "head" block; everything else (the final norm) rides with the last layer block.

Only the active block has requires_grad, an fp32 master copy (a real copy only when the model
weights are bf16/fp16) and, in optimizer.py, Adam state. Because nothing below the active
block requires grad, autograd never runs a backward through the layers underneath it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

_LAYER = re.compile(r"^(?P<prefix>.*\blayers)\.(?P<index>\d+)\.")


@dataclass(frozen=True)
class Block:
    """One unit of block-coordinate optimisation."""

    index: int
    name: str
    param_names: tuple[str, ...]


def partition_blocks(model: nn.Module, layers_per_block: int, embeddings: str = "block") -> list[Block]:
    """Blocks in bottom-to-top order: [embed], layers 0..k-1, ..., [head].

    Raises ValueError when the model has no `layers.N.` parameters or k exceeds the layer count.
    """
    if layers_per_block < 1:
        raise ValueError(f"layers-per-block must be >= 1, got {layers_per_block}")
    if embeddings not in ("block", "frozen"):
        raise ValueError(f"embeddings must be 'block' or 'frozen', got '{embeddings}'")
    by_layer: dict[int, list[str]] = {}
    embed, head, rest = [], [], []
    input_embedding = model.get_input_embeddings()
    embed_ids = {id(p) for p in input_embedding.parameters()} if input_embedding is not None else set()
    output_embedding = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in output_embedding.parameters()} if output_embedding is not None else set()
    stacks = set()
    for name, param in model.named_parameters():  # tied weights are yielded once
        match = _LAYER.match(name)
        if match:
            stacks.add(match["prefix"])
            by_layer.setdefault(int(match["index"]), []).append(name)
        elif id(param) in embed_ids:
            embed.append(name)
        elif id(param) in head_ids:
            head.append(name)
        else:
            rest.append(name)
    if len(stacks) > 1:  # e.g. a vision tower beside the decoder: their layer N must not share a block
        raise ValueError(f"model has several layer stacks {sorted(stacks)}: blocks are cut from one decoder stack")
    num_layers = len(by_layer)
    if num_layers == 0:
        raise ValueError("model has no decoder layers named '...layers.N...': cannot form blocks")
    if layers_per_block > num_layers:
        raise ValueError(f"layers-per-block={layers_per_block} exceeds the model's {num_layers} layers")
    blocks: list[Block] = []
    if embeddings == "block" and embed:
        blocks.append(Block(0, "embed", tuple(embed)))
    layer_ids = sorted(by_layer)
    for start in range(0, num_layers, layers_per_block):
        chunk = layer_ids[start : start + layers_per_block]
        names = [n for i in chunk for n in by_layer[i]]
        if start + layers_per_block >= num_layers:
            names += rest  # final norm: trained with the top layers
        blocks.append(Block(len(blocks), f"layers.{chunk[0]}-{chunk[-1]}", tuple(names)))
    if embeddings == "block" and head:
        blocks.append(Block(len(blocks), "head", tuple(head)))
    return blocks


class ActiveBlock:
    """The parameters of the active block, with their fp32 master copies.

    On fp32 models the master IS the model parameter (no copy); on bf16 models a separate fp32
    tensor is optimised and written back into the bf16 weight after every update.
    """

    def __init__(self, model: nn.Module, block: Block) -> None:
        self.block = block
        params = dict(model.named_parameters())
        for param in model.parameters():
            param.requires_grad_(False)
            param.grad = None
        self.params = [params[name] for name in block.param_names]
        for param in self.params:
            param.requires_grad_(True)
        self.masters = [
            p if p.dtype == torch.float32 else p.detach().float().requires_grad_(False) for p in self.params
        ]
        self.has_copy = any(m is not p for m, p in zip(self.masters, self.params))

    def grads_to_master(self) -> None:
        """Move the model grads onto the fp32 masters (a no-op on fp32 models)."""
        if not self.has_copy:
            return
        for master, param in zip(self.masters, self.params):
            master.grad = None if param.grad is None else param.grad.float()
            param.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        """Copy the fp32 masters into the (bf16) model weights."""
        if self.has_copy:
            for master, param in zip(self.masters, self.params):
                param.copy_(master)

    def values(self) -> dict[str, torch.Tensor]:
        """The block as it travels: the model weights in their own dtype, detached."""
        return {name: p.detach() for name, p in zip(self.block.param_names, self.params)}

    def release(self) -> None:
        """Drop grads and master copies and freeze the block again."""
        for param in self.params:
            param.grad = None
            param.requires_grad_(False)
        self.masters = []
        self.params = []


def block_numel(model: nn.Module, block: Block) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in block.param_names)
