"""Each fast path in the code against the plainer way it replaces (SmolLM2-135M, CPU fp32, batch 4 x 64
text tokens).

    python bench/fast_paths.py

1. Loss: LM head on the label positions only ([N, H] -> [N, V]) versus the usual full logits
   ([B, L, H] -> [B, L, V]) then picking the label positions (task.py).
2. Adam on the active block: torch.optim.Adam(foreach=True) (one multi-tensor kernel) versus the
   per-tensor loop (foreach=False) (core/optimizer.py).
3. Blocks on the wire: raw bytes in the block's dtype (protocol/packing.py) versus numpy's np.save
   serialisation that Array(ndarray) uses (header per tensor) and an fp32 upcast of bf16.
4. A block through a node, each inner step: packing it (the payload is the packed buffer itself
   versus a copy of it into a bytes subclass) and checking two neighbour blocks for
   NaN/Inf (one sum per tensor versus an isfinite mask) (protocol/packing.py, core/gossip.py).
5. The embedding block (28M parameters, the largest) through a mix, each inner step: float64
   accumulation in a reused slice buffer versus a float64 copy of the whole block, and the BMA
   fold in place versus new tensors for h, m and v (core/gossip.py, core/optimizer.py); the
   neighbour check with the distance pass doubling as the NaN/Inf check versus a separate sum; the
   relay's consensus distance over 4 such blocks in slices versus a stacked float64 copy
   (core/reference.py).
6. BMA without a theta copy: fold recomputing theta - half from Adam's moments, in slices, versus
   step() cloning theta and fold working in that clone (core/optimizer.py). Saves a block of fp32
   (16 -> 12 bytes per fp32 parameter) for some arithmetic.
"""

from __future__ import annotations

import platform
import sys
import time

import torch
import torch.nn.functional as F
from flwr.app import Array

from deca_flower.config import DecaConfig
from deca_flower.core.gossip import _all_finite, check_block, mix
from deca_flower.core.optimizer import BlockAdam
from deca_flower.core.reference import consensus_distance
from deca_flower.protocol.packing import PACKED_KEY, record_bytes
from deca_flower.protocol.tensors import block_to_record
from deca_flower.runtime import build_runtime


def best_of(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    runtime = build_runtime(DecaConfig(eval_samples=8), 0)
    model, task, node = runtime.node.model, runtime.task, runtime.node
    batch = node.make_batch(node.sampler.next())

    def full_logits_loss():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits[batch["rows"], batch["cols"]].float(), batch["targets"])

    node.start_block(len(runtime.blocks) - 1)
    for name, loss_fn in (("label positions only", lambda: task.loss(model, batch)), ("full logits", full_logits_loss)):
        t = best_of(lambda f=loss_fn: f().backward())
        print(f"loss + backward (top block active), {name}: {t:.3f} s")
    node.end_block()
    with torch.no_grad():
        print(f"check: same loss {float(task.loss(model, batch)):.6f} vs {float(full_logits_loss()):.6f}")

    block = runtime.blocks[len(runtime.blocks) // 2]
    params = [torch.randn(dict(model.named_parameters())[n].shape, requires_grad=True) for n in block.param_names]
    for p in params:
        p.grad = torch.randn_like(p)
    for foreach in (True, False):
        adam = torch.optim.Adam(params, lr=1e-4, foreach=foreach)
        print(f"Adam step on {block.name} ({sum(p.numel() for p in params):,} params), foreach={foreach}: "
              f"{best_of(adam.step):.4f} s")

    tensors = {n: dict(model.named_parameters())[n].detach() for n in block.param_names}
    raw = record_bytes(block_to_record(tensors))
    npy = sum(len(Array(t.numpy()).data) for t in tensors.values())
    bf16 = record_bytes(block_to_record({n: t.to(torch.bfloat16) for n, t in tensors.items()}))
    print(f"block bytes: raw {raw:,}; np.save {npy:,} (+{npy - raw} header bytes); bf16 raw {bf16:,} vs fp32 upcast {raw:,}")

    class BytesPayload(bytes):  # the alternative: a bytes subclass (its own pickling could move it out of band)
        pass

    as_view = best_of(lambda: block_to_record(tensors))
    as_copy = best_of(lambda: BytesPayload(memoryview(block_to_record(tensors)[PACKED_KEY].data)))
    print(f"pack {block.name}: payload = the packed buffer {as_view:.4f} s; + a bytes-subclass copy {as_copy:.4f} s")
    neighbours = [{n: t + 1e-3 * torch.randn_like(t) for n, t in tensors.items()} for _ in range(2)]
    masks = best_of(lambda: [bool(torch.isfinite(t).all()) for b in neighbours for t in b.values()])
    sums = best_of(lambda: [bool(torch.isfinite(t.sum())) for b in neighbours for t in b.values()])
    checked = best_of(lambda: [check_block(b, tensors, "neighbour", 0.5) for b in neighbours])
    print(f"NaN/Inf check of 2 neighbour blocks: isfinite mask {masks:.4f} s, one sum per tensor {sums:.4f} s; "
          f"check_block (names, shapes, dtypes, finite, max-block-deviation=0.5) {checked:.4f} s")
    embedding_block(runtime)


def embedding_block(runtime) -> None:
    """Item 5, each plainer way written out beside the code's."""
    embed = next(b for b in runtime.blocks if "embed" in b.name)
    own = [dict(runtime.node.model.named_parameters())[n].detach().clone() for n in embed.param_names]
    numel = sum(t.numel() for t in own)
    others = [(0.25, [t + 1e-4 * torch.randn_like(t) for t in own]) for _ in range(2)]

    def mix_whole_block():
        out = [t.double().mul_(0.5) for t in own]
        for weight, tensors in others:
            for acc, t in zip(out, tensors):
                acc.add_(t, alpha=weight)
        return [acc.float() for acc in out]

    assert all(torch.equal(a, b) for a, b in zip(mix_whole_block(), mix(own, 0.5, others)))
    print(f"mix {embed.name} ({numel:,} params) with 2 neighbours: slices {best_of(lambda: mix(own, 0.5, others)):.4f} s; "
          f"whole-block float64 copy {best_of(mix_whole_block):.4f} s (same result bit for bit)")
    mixed = mix(own, 0.5, others)
    theta, m, v = ([t.clone() for t in own] for _ in range(3))

    def fold_new_tensors():
        for before, mx, m_, v_ in zip(theta, mixed, m, v):
            h = (before - mx).div_(1e-4)
            m_.mul(0.9).add_(h, alpha=0.1), v_.mul(0.999).addcmul_(h, h, value=0.001)

    def fold_in_place():
        for before, mx, m_, v_ in zip(theta, mixed, m, v):
            h = before.sub_(mx).div_(1e-4)
            m_.mul_(0.9).add_(h, alpha=0.1), v_.mul_(0.999).addcmul_(h, h, value=0.001)

    print(f"BMA fold arithmetic on {embed.name}: in place {best_of(fold_in_place):.4f} s; "
          f"new h, m, v {best_of(fold_new_tensors):.4f} s")
    masters = [t.clone() for t in own]
    optimizer = BlockAdam(masters, lr=1e-4)
    for t in masters:
        t.grad = torch.randn_like(t)
    optimizer.step()

    def fold_recomputed():
        optimizer._stepped = [True] * len(masters)  # as after a step: the fold is due
        optimizer.fold(mixed)

    def fold_with_theta_copy():
        for master, mx, m_, v_ in zip(masters, mixed, m, v):
            h = master.clone().sub_(mx).div_(1e-4)  # the clone step() took, then the in-place fold
            m_.mul_(0.9).add_(h, alpha=0.1), v_.mul_(0.999).addcmul_(h, h, value=0.001)
            master.copy_(mx)

    print(f"BMA fold on {embed.name}: theta copy + fold in it {best_of(fold_with_theta_copy):.4f} s; "
          f"recomputed from the moments, no copy {best_of(fold_recomputed):.4f} s")
    block = dict(zip(embed.param_names, own))
    received = [dict(zip(embed.param_names, tensors)) for _, tensors in others]

    def check_with_separate_sum():
        for b in received:
            [_all_finite(t) for t in b.values()]
            check_block(b, block, "neighbour", 0.5)

    print(f"check 2 neighbour {embed.name} blocks, max-block-deviation=0.5: distance pass as the NaN/Inf check "
          f"{best_of(lambda: [check_block(b, block, 'neighbour', 0.5) for b in received]):.4f} s; "
          f"+ a separate sum {best_of(check_with_separate_sum):.4f} s")
    blocks = [block, *received, received[0]]

    def stacked_distance():
        total = 0.0
        for name in blocks[0]:
            stacked = torch.stack([b[name].double() for b in blocks])
            total += float(((stacked - stacked.mean(0)) ** 2).sum())
        return total / len(blocks)

    print(f"consensus distance of 4 {embed.name} blocks: slices {best_of(lambda: consensus_distance(blocks), 3):.4f} s; "
          f"stacked float64 {best_of(stacked_distance, 3):.4f} s "
          f"(values {consensus_distance(blocks):.10g} vs {stacked_distance():.10g})")


if __name__ == "__main__":
    main()
