"""DECA on a GPU: memory and step time per block against full-parameter Adam, bf16, per architecture.

    python bench/gpu_memory_and_steps.py [--models smollm2-135m qwen2.5-0.5b qwen2.5-1.5b]
        [--batch-size 8] [--seq-len 512] [--layers-per-block 2] [--steps 5] [--json FILE]

Needs only torch, transformers and deca_flower.core, so it runs on a bare GPU machine (no flwr,
datasets or omegaconf). Weights are random, built from each architecture's published config:
memory and step time depend on shapes, not values. The loss is next-token cross-entropy over
every position of random token sequences (instruction tuning's cost, the LM head on all tokens).

Each mode runs in its own subprocess so the memory peaks do not mix:
- deca: the node trains the embedding, bottom, middle and top layer blocks in turn (fp32 masters
  of the active block only, fp32 grads, Adam moments; BMA keeps no theta copy);
- full: one block holding every parameter, bma none: the dadam / FedAvg client's full Adam.
One inner step = local Adam step, the half-step block copied to the host (what is sent), and the
mix with two neighbour halves (ring, W = 1/3 each) held in host memory as they arrive, BMA fold.
No network. Step times are medians over --steps steps after two warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config

from deca_flower.core.blocks import Block, partition_blocks
from deca_flower.core.node import AdamSettings, BatchSampler, DecaNode

# the published configs' shapes (hf.co/<id>/config.json); tied input/output embeddings in all three
ARCHITECTURES: dict[str, PretrainedConfig] = {
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "qwen2.5-0.5b": Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "qwen2.5-1.5b": Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    # a few-MB model for checking this script on a CPU (tests/test_gpu_bench_script.py)
    "tiny": LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True),
}
NEIGHBOUR_WEIGHT = 1 / 3  # ring: self and two neighbours


def build_node(name: str, device: torch.device, blocks_of, bma: str, args) -> DecaNode:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(ARCHITECTURES[name], dtype=dtype)
    model.eval()  # as deca_flower.models.load_model: no dropout
    model.config.use_cache = False
    generator = torch.Generator().manual_seed(0)
    examples = 64
    tokens = torch.randint(model.config.vocab_size, (examples, args.seq_len), generator=generator).to(device)
    return DecaNode(model, blocks_of(model), AdamSettings(lr=1e-5, bma=bma), BatchSampler(examples, args.batch_size, 0, 0),
                    make_batch=lambda indices: tokens[indices],
                    loss_fn=lambda model, ids: model(input_ids=ids, labels=ids).loss)


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def measure_block(node: DecaNode, index: int, device: torch.device, steps: int) -> dict:
    """Median times of the inner step's parts and the peak memory while block `index` is active."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    node.peak_optimizer_bytes = 0
    node.start_block(index)
    parts: dict[str, list[float]] = {"local_step_s": [], "to_host_s": [], "mix_fold_s": []}
    for step in range(steps + 2):
        start = sync(device)
        _, half = node.local_step(copy=False)
        stepped = sync(device)
        sent = {k: v.to("cpu") for k, v in half.items()}
        copied = sync(device)
        neighbours = [(NEIGHBOUR_WEIGHT, sent), (NEIGHBOUR_WEIGHT, sent)]  # as received: host tensors
        node.apply_mix(1 - 2 * NEIGHBOUR_WEIGHT, neighbours, validated=True)
        mixed = sync(device)
        if step >= 2:  # two warm-up steps: kernel selection, allocator growth
            for key, seconds in zip(parts, (stepped - start, copied - stepped, mixed - copied)):
                parts[key].append(seconds)
    params = sum(m.numel() for m in node.active.masters)
    node.end_block()
    row = {"block": node.blocks[index].name, "params": params, "opt_grad_bytes": node.peak_optimizer_bytes,
           "ratio_to_16B_per_param": node.peak_optimizer_bytes / (16 * params)}
    row.update({key: statistics.median(values) for key, values in parts.items()})
    row["inner_step_s"] = row["local_step_s"] + row["to_host_s"] + row["mix_fold_s"]
    if device.type == "cuda":
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return row


def run_mode(name: str, mode: str, args) -> dict:
    device = torch.device(args.device)
    if mode == "deca":
        node = build_node(name, device, lambda m: partition_blocks(m, args.layers_per_block), "full", args)
        n = len(node.blocks)
        picks = list(dict.fromkeys([1, (n - 1) // 2, n - 1, 0]))  # bottom / middle / top layer blocks, embedding
        roles = {"bottom": node.blocks[1].name, "top": node.blocks[n - 1].name, "embed": node.blocks[0].name}
    else:
        node = build_node(name, device, lambda m: [Block(0, "all", tuple(p for p, _ in m.named_parameters()))],
                          "none", args)
        picks, roles = [0], {}
    rows = [measure_block(node, i, device, args.steps) for i in picks]
    return {"rows": rows, "roles": roles, "num_blocks": len(node.blocks),
            "model_params": sum(p.numel() for p in node.model.parameters()),
            "model_bytes": sum(p.numel() * p.element_size() for p in node.model.parameters())}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs; "
                f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    return f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads; torch {torch.__version__}"


def print_model(name: str, result: dict, args) -> None:
    deca, full = result["deca"], result["full"]
    mib = 2**20
    print(f"\n## {name}: {deca['model_params'] / 1e6:.0f} M parameters, weights {deca['model_bytes'] / mib:.0f} MiB, "
          f"{deca['num_blocks']} DECA blocks of {args.layers_per_block} layers (+ embedding)")
    print("| mode | active block | params | local step ms | to host ms | mix+fold ms | inner step ms "
          "| optimizer+grad MiB | / (16 B x params) | peak allocated MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, part in (("deca", deca), ("full Adam", full)):
        for r in part["rows"]:
            peak = f"{r['peak_allocated_bytes'] / mib:.0f}" if "peak_allocated_bytes" in r else "n/a"
            print(f"| {mode} | {r['block']} | {r['params'] / 1e6:.1f} M | {r['local_step_s'] * 1e3:.1f} "
                  f"| {r['to_host_s'] * 1e3:.1f} | {r['mix_fold_s'] * 1e3:.1f} | {r['inner_step_s'] * 1e3:.1f} "
                  f"| {r['opt_grad_bytes'] / mib:.1f} | {r['ratio_to_16B_per_param']:.3f} | {peak} |")
    worst = max(deca["rows"], key=lambda r: r["ratio_to_16B_per_param"])
    print(f"DECA optimizer+grad bytes / (16 B x active params): max {worst['ratio_to_16B_per_param']:.3f} "
          f"({worst['block']}; goal <= 1.10)")
    if "peak_allocated_bytes" in full["rows"][0]:
        deca_peak = max(r["peak_allocated_bytes"] for r in deca["rows"])
        full_peak = full["rows"][0]["peak_allocated_bytes"]
        print(f"peak allocated: DECA {deca_peak / mib:.0f} MiB (any block), full Adam {full_peak / mib:.0f} MiB, "
              f"ratio {deca_peak / full_peak:.3f} ((1 + 10/B)/8 = {(1 + 10 / deca['num_blocks']) / 8:.3f})")
    rows = {r["block"]: r for r in deca["rows"]}
    bottom, top, embed = (rows[deca["roles"][role]] for role in ("bottom", "top", "embed"))
    print(f"backward truncation: top {top['block']} local step {top['local_step_s'] * 1e3:.1f} ms vs bottom "
          f"{bottom['block']} {bottom['local_step_s'] * 1e3:.1f} ms (ratio "
          f"{top['local_step_s'] / bottom['local_step_s']:.2f}); full-model step "
          f"{full['rows'][0]['local_step_s'] * 1e3:.1f} ms; embedding block {embed['local_step_s'] * 1e3:.1f} ms")
    tokens = args.batch_size * args.seq_len
    print(f"tokens per inner step {tokens}: DECA {tokens / statistics.mean(r['inner_step_s'] for r in deca['rows']):,.0f}"
          f" tokens/s (mean over the blocks above), full Adam {tokens / full['rows'][0]['inner_step_s']:,.0f} tokens/s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b"],
                        choices=sorted(ARCHITECTURES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--layers-per-block", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--mode", choices=["deca", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:
        print(json.dumps(run_mode(args.models[0], args.mode, args)))
        return
    print(f"# command: python bench/gpu_memory_and_steps.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# machine: {machine(torch.device(args.device))}")
    print(f"# batch {args.batch_size} x {args.seq_len} tokens, bf16 weights on CUDA (fp32 on CPU), "
          f"median of {args.steps} steps")
    common = ["--device", args.device, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
              "--layers-per-block", str(args.layers_per_block), "--steps", str(args.steps)]
    results = {}
    for name in args.models:
        results[name] = {}
        for mode in ("deca", "full"):
            out = subprocess.run([sys.executable, __file__, "--models", name, "--mode", mode, *common],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{name} {mode} failed:\n{out.stderr[-3000:]}")
            results[name][mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print_model(name, results[name], args)
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(torch.device(args.device)), "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
