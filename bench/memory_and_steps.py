"""Memory per node and step time per block, DECA (one active block) vs full Adam, measured.

    python bench/memory_and_steps.py [--model smollm2-135m-instruct] [--batch-size 4] [--max-text-tokens 64]

Prints, for the bottom / a middle / the top layer block and the embedding block: step time and
optimizer+grad bytes (grads, fp32 masters if any, Adam moments), next to the
prediction of `deca-flower plan`; then the same for full-parameter Adam; and each mode's process
peak RSS (each mode runs in its own subprocess so the peaks do not mix).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

from deca_flower.config import DecaConfig
from deca_flower.runtime import build_runtime


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_block(runtime, index: int, repeats: int = 3) -> dict:
    node = runtime.node
    node.start_block(index)
    node.peak_optimizer_bytes = 0
    times = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        node.local_step(copy=False)  # batch, forward, backward, Adam: what the node measures as its peak
        if r:  # first step is warm-up
            times.append(time.perf_counter() - start)
        node.apply_mixed([m.detach().clone() for m in node.active.masters])  # no neighbours: mixed = own
    params = sum(m.numel() for m in node.active.masters)
    node.end_block()
    return {"block": runtime.blocks[index].name, "params": params, "step_s": min(times),
            "opt_grad_bytes": node.peak_optimizer_bytes, "ratio_to_16B_per_param": node.peak_optimizer_bytes / (16 * params)}


def measure_full_adam(runtime, repeats: int = 2) -> dict:
    model = runtime.node.model
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    adam = torch.optim.Adam(params, lr=1e-5, foreach=True)
    times, opt_bytes = [], 0
    for r in range(repeats + 1):
        batch = runtime.node.make_batch(runtime.node.sampler.next())
        start = time.perf_counter()
        runtime.task.loss(model, batch).backward()
        grads = tensor_bytes(p.grad for p in params if p.grad is not None)
        adam.step()
        if r:
            times.append(time.perf_counter() - start)
        state = tensor_bytes(t for s in adam.state.values() for t in s.values() if t.dim())
        opt_bytes = max(opt_bytes, grads + state)
        adam.zero_grad(set_to_none=True)
    return {"block": "whole model (full Adam)", "params": sum(p.numel() for p in params), "step_s": min(times),
            "opt_grad_bytes": opt_bytes, "ratio_to_16B_per_param": opt_bytes / (16 * sum(p.numel() for p in params))}


def run_mode(mode: str, cfg: DecaConfig) -> dict:
    runtime = build_runtime(cfg, 0)
    if mode == "full":
        rows = [measure_full_adam(runtime)]
    else:
        n = len(runtime.blocks)
        first_layer = 1 if runtime.blocks[0].name == "embed" else 0
        picks = [first_layer, (first_layer + n - 1) // 2, n - 1] + ([0] if first_layer else [])
        rows = [measure_block(runtime, i) for i in picks]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "rows": rows, "peak_rss_bytes": peak_rss,
            "model_bytes": sum(p.numel() * p.element_size() for p in runtime.node.model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DecaConfig.model)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-text-tokens", type=int, default=64)
    parser.add_argument("--mode", choices=["deca", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = DecaConfig(model=args.model, batch_size=args.batch_size, max_text_tokens=args.max_text_tokens, eval_samples=8)
    if args.mode:
        print(json.dumps(run_mode(args.mode, cfg)))
        return
    from deca_flower.plan import make_plan

    plan = make_plan(cfg)
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, CUDA: {torch.cuda.is_available()}")
    results = {}
    for mode in ("deca", "full"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--model", args.model, "--batch-size",
                              str(args.batch_size), "--max-text-tokens", str(args.max_text_tokens)],
                             capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 1024**2
    print("| block | params | step s | optimizer+grad MiB | / (16 B x params) |")
    print("|---|---|---|---|---|")
    for mode in ("deca", "full"):
        for row in results[mode]["rows"]:
            print(f"| {row['block']} | {row['params']:,} | {row['step_s']:.2f} | {row['opt_grad_bytes'] / mib:.1f} "
                  f"| {row['ratio_to_16B_per_param']:.3f} |")
    deca_max = max(r["opt_grad_bytes"] for r in results["deca"]["rows"])
    full = results["full"]["rows"][0]["opt_grad_bytes"]
    print(f"\nplan: DECA optimizer+grad {plan.deca_optimizer_bytes / mib:.1f} MiB (measured {deca_max / mib:.1f}, "
          f"{deca_max / plan.deca_optimizer_bytes:.3f}x); full Adam {plan.full_adam_optimizer_bytes / mib:.1f} MiB "
          f"(measured {full / mib:.1f}, {full / plan.full_adam_optimizer_bytes:.3f}x)")
    deca_rss, full_rss = results["deca"]["peak_rss_bytes"], results["full"]["peak_rss_bytes"]
    print(f"peak RSS: DECA {deca_rss / mib:.0f} MiB, full Adam {full_rss / mib:.0f} MiB, ratio {deca_rss / full_rss:.3f}"
          f" (model weights {results['deca']['model_bytes'] / mib:.0f} MiB)")
    rows = {r["block"]: r for r in results["deca"]["rows"]}
    names = list(rows)
    print(f"backward truncation: top block {names[2]} step {rows[names[2]]['step_s']:.2f} s vs bottom layer block "
          f"{names[0]} {rows[names[0]]['step_s']:.2f} s (ratio {rows[names[2]]['step_s'] / rows[names[0]]['step_s']:.2f})")


if __name__ == "__main__":
    main()
