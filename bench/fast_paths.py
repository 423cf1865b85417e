"""Before/after figures for the fast paths in the code (SmolLM2-135M, CPU fp32, batch 4 x 64 text tokens).

    python bench/fast_paths.py

1. Loss: LM head on the label positions only ([N, H] -> [N, V]) versus the usual full logits
   ([B, L, H] -> [B, L, V]) then picking the label positions (task.py).
2. Adam on the active block: torch.optim.Adam(foreach=True) (one multi-tensor kernel) versus the
   per-tensor loop (foreach=False) (core/optimizer.py).
3. Blocks on the wire: raw bytes in the block's dtype (records.py) versus numpy's np.save
   serialisation that Array(ndarray) uses (header per tensor) and an fp32 upcast of bf16.
"""

from __future__ import annotations

import platform
import sys
import time

import torch
import torch.nn.functional as F
from flwr.app import Array

from deca_flower.config import DecaConfig
from deca_flower.flower.records import block_to_record, record_bytes
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


if __name__ == "__main__":
    main()
