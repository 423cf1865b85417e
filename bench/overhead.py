"""Framework overhead: wall time per inner step under `flwr run` (simulation engine) versus the
single-process reference doing the same math on the same config and seed.

    python bench/overhead.py [--run-config "..." | --large-blocks] [--repeats 3] [--torch-threads N]

Both runs train all nodes on this machine; per inner step = training wall time / inner steps
(the Flower figure comes from the run's metrics.jsonl, evaluation excluded). Each is split into
the nodes' forward + backward + Adam time (`DecaNode.local_step`, summed over nodes: one actor
runs them one after another) and the rest (mixing, checks, moving blocks). The same math takes
up to 20 % longer in one run than in the next on this 2-core machine, so reference and Flower
runs alternate (--repeats pairs) and the goal is judged on the median of the pairs' ratios.
--torch-threads 1 runs both sides on one torch thread, which leaves the engine's processes
(SuperLink, Ray, the ServerApp) a core of their own on this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from deca_flower.cli import parse_overrides
from deca_flower.config import DecaConfig
from deca_flower.core.node import DecaNode
from deca_flower.reference_run import run_reference_job

ROOT = Path(__file__).resolve().parent.parent
# the main job's nodes, graph and blocks (embeddings + 15 x 2 layers), fewer steps
DEFAULT = "steps-per-block=2 eval-initial=false eval-samples=8 eval-every-blocks=0"
# 6-layer blocks of 81 MiB, three times the default's: how the overhead grows with the bytes moved
LARGE_BLOCKS = ("embeddings='frozen' layers-per-block=6 steps-per-block=2 eval-initial=false eval-samples=8 "
                "eval-every-blocks=0")


def flower_per_step(overrides: str, num_nodes: int, torch_threads: int) -> tuple[float, float, int, set[int]]:
    run_name = f"overhead-{int(time.time())}"
    results = Path(tempfile.mkdtemp())
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    if torch_threads:  # Ray sets a worker's OMP_NUM_THREADS to its CPUs unless it is already set
        env["OMP_NUM_THREADS"] = str(torch_threads)
    cmd = ["flwr", "run", str(ROOT), "--stream", "--run-config", f"{overrides} run-name='{run_name}' results-dir='{results}'",
           "--federation-config", f"num-supernodes={num_nodes}"]
    run = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=3600)
    threads = {int(n) for n in re.findall(r"\((\d+) torch threads\)", run.stdout + run.stderr)}  # as the nodes report
    if not threads:  # Flower versions that stream no ClientApp logs: the nodes inherit the local SuperLink's env
        threads = superlink_omp_threads()
    if torch_threads and threads != {torch_threads}:
        raise SystemExit(f"asked for {torch_threads} torch threads, the nodes report {sorted(threads)}: not comparable "
                         "(a local SuperLink started earlier keeps its environment: stop it and rerun)")
    records = [json.loads(line) for line in (results / run_name / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(results)  # the nodes' checkpoints, GBs; kept when a run failed
    visits = [r for r in records if r["kind"] == "visit"]
    steps = visits[-1]["step"]
    compute = sum(v["step_compute_sum_s"] * (v["step"] - prev["step"]) for prev, v in zip([{"step": 0}, *visits], visits))
    return visits[-1]["elapsed_s"] / steps, compute / steps, steps, threads


def superlink_omp_threads() -> set[int]:
    """OMP_NUM_THREADS of the running local SuperLinks (Linux /proc), which its simulations inherit."""
    found = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"flower-superlink" not in (proc / "cmdline").read_bytes():
                continue
            env = dict(line.split(b"=", 1) for line in (proc / "environ").read_bytes().split(b"\0") if b"=" in line)
        except OSError:
            continue
        found.add(int(env.get(b"OMP_NUM_THREADS", b"0")))  # 0: unset, torch's default
    return found


def timed_local_steps() -> list[float]:
    """Record the duration of every DecaNode.local_step in this process (the reference)."""
    durations: list[float] = []
    local_step = DecaNode.local_step

    def timed(self: DecaNode, **kwargs):
        tic = time.time()
        result = local_step(self, **kwargs)
        durations.append(time.time() - tic)
        return result

    DecaNode.local_step = timed
    return durations


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-config", default=DEFAULT)
    parser.add_argument("--large-blocks", action="store_true", help="run-config LARGE_BLOCKS (6-layer blocks)")
    parser.add_argument("--repeats", type=int, default=3, help="reference / flwr run pairs, run alternately")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch threads on both sides (0: torch's default)")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.large_blocks:
        args.run_config = LARGE_BLOCKS
    cfg = DecaConfig.from_run_config(parse_overrides(args.run_config))
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"CUDA {torch.cuda.is_available()}, reference on {torch.get_num_threads()} torch threads")
    durations = timed_local_steps()
    ratios, added = [], []
    for pair in range(1, args.repeats + 1):
        durations.clear()
        reference = run_reference_job(cfg)
        ref_step = reference["train_s"] / reference["inner_steps"]
        ref_compute = sum(durations) / reference["inner_steps"]
        flower_step, flower_compute, steps, threads = flower_per_step(args.run_config, cfg.num_nodes, args.torch_threads)
        ratios.append(flower_step / ref_step)
        added.append((flower_step - flower_compute) - (ref_step - ref_compute))
        print(f"pair {pair}: reference {ref_step:.2f} s per inner step = {ref_compute:.2f} s fwd+bwd+Adam (all nodes) + "
              f"{ref_step - ref_compute:.2f} s rest ({reference['inner_steps']} steps, {cfg.num_nodes} nodes); "
              f"flwr run simulation {flower_step:.2f} s = {flower_compute:.2f} s + {flower_step - flower_compute:.2f} s rest "
              f"({steps} steps, nodes on {'/'.join(map(str, sorted(threads)))} torch threads); ratio {ratios[-1]:.3f}",
              flush=True)
    print(f"overhead ratio: median {statistics.median(ratios):.3f} over {len(ratios)} pairs "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}; goal <= 1.15)")
    print(f"rest (all but fwd+bwd+Adam) that Flower adds per inner step: median {statistics.median(added):.3f} s")


if __name__ == "__main__":
    main()
