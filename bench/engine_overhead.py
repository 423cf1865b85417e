"""Per-inner-step overhead in Flower's two engines, same job, same seed:

- simulation: `flwr run . --federation-config "num-supernodes=N"` with the default resources (2 CPUs
  per node: on this 2-core machine one Ray actor runs the nodes one after another);
- deployment: a local flower-superlink + N `deca-flower-supernode`s on 127.0.0.1 (`flwr run . loopback`),
  each node's ClientApp warm in its SuperNode process, one core each (OMP_NUM_THREADS=1), side by side.

Per inner step the coordinator records the wall time of the message round and each node's
forward + backward + Adam time. Overhead = wall - compute on the critical path: the sum over nodes
when they run one after another (simulation), the slowest node when they run side by side
(deployment); it is message passing, (de)serialising, mixing and bookkeeping. The first visit is
left out (warm-up).

`--variants` runs only the deployment, once per row of VARIANTS (or the rows numbered): Flower's
stock SuperNode, where every message runs in a fresh `flwr-clientapp` process that rebuilds the
node from disk, against `deca-flower-supernode`.

The deployment line is followed by what each kind of process used per inner step: CPU seconds
(read from /proc every 0.5 s while the job runs, evaluation and model loading included) and
peak RSS, for the SuperLink, the ServerApp, the SuperNodes and any per-message ClientApp processes.

    python bench/engine_overhead.py [--nodes 2] [--run-config "..." | --large-blocks] [--variants [ROW ...]]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from deca_flower.flower.loopback import Loopback

ROOT = Path(__file__).resolve().parent.parent

# the main job's blocks (embeddings + 15 x 2 layers; with 2 nodes the graph is one edge), fewer steps
DEFAULT = "steps-per-block=4 eval-initial=false eval-samples=8 eval-every-blocks=0"
# 6-layer blocks of 81 MiB, three times the default's
LARGE_BLOCKS = ("topology='complete' embeddings='frozen' layers-per-block=6 steps-per-block=4 eval-initial=false "
                "eval-samples=8 eval-every-blocks=0")


def per_step(run_dir: Path, compute_key: str) -> dict[str, float]:
    visits = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "visit"]
    if len(visits) < 2:
        raise RuntimeError(f"{run_dir} has {len(visits)} block visits; see its metrics.jsonl")
    walls = np.array([v["step_wall_s"] for v in visits[1:]])
    computes = np.array([v[compute_key] for v in visits[1:]])
    return {"wall": float(walls.mean()), "compute": float(computes.mean()), "overhead": float((walls - computes).mean()),
            "visits": len(visits) - 1}


def simulation(overrides: str, nodes: int, out: Path) -> dict[str, float]:
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    cmd = ["flwr", "run", str(ROOT), "--stream", "--run-config", f"{overrides} run-name='sim' results-dir='{out}'",
           "--federation-config", f"num-supernodes={nodes}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-3000:] + result.stderr[-3000:])
    return per_step(out / "sim", "step_compute_sum_s")


# deployment settings: (SuperLink state in SQLite, (SuperNode program, its arguments), SuperExec poll interval)
VARIANTS = {
    "flower-supernode (a flwr-clientapp process per message, node state from disk)":
        (False, ("flower-supernode", ()), None),
    "deca-flower-supernode (polls capped at 0.25 s, the ClientApp warm in the SuperNode)":
        (False, ("deca-flower-supernode", ()), "0.25"),
}
DECA_DEFAULT = list(VARIANTS)[-1]


ROLES = {"superlink": "flower-superlink", "serverapp": "flwr-serverapp", "supernodes": "supernode",
         "clientapps": "flwr-clientapp"}  # what a process's command line contains


class ProcessWatch(threading.Thread):
    """Samples /proc while a job runs: CPU seconds and peak RSS of every process, by role."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: dict[int, tuple[str, float, int]] = {}  # pid -> (role, cpu s, peak RSS bytes)
        self.done = threading.Event()
        # processes of an earlier job (a runner still exiting, a local simulation SuperLink) are not this job's
        self.earlier = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}

    def run(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self.done.wait(0.5):
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit() or int(proc.name) in self.earlier:
                    continue
                try:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    role = next((r for r, marker in ROLES.items() if marker in cmd), None)
                    if role is None or "flwr run" in cmd:
                        continue
                    fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                    peak = next(int(line.split()[1]) * 1024 for line in (proc / "status").read_text().splitlines()
                                if line.startswith("VmHWM"))
                except (OSError, StopIteration, ValueError):
                    continue  # gone meanwhile, or a kernel thread
                self.seen[int(proc.name)] = (role, (int(fields[11]) + int(fields[12])) / tick, peak)

    def by_role(self) -> dict[str, tuple[float, int]]:
        """Role -> (CPU seconds summed over its processes, largest peak RSS of one of them)."""
        out: dict[str, tuple[float, int]] = {}
        for role, cpu, peak in self.seen.values():
            total, biggest = out.get(role, (0.0, 0))
            out[role] = (total + cpu, max(biggest, peak))
        return out


def deployment(overrides: str, nodes: int, out: Path, variant: str = DECA_DEFAULT) -> dict[str, float]:
    out.mkdir(parents=True)
    database, (program, args), superexec_poll = VARIANTS[variant]
    federation = Loopback(out, supernode_program=program, supernode_args=args,
                          database=out / "link.db" if database else None)
    federation.env["OMP_NUM_THREADS"] = "1"  # one core per node, as the simulation actors get
    if superexec_poll is None:
        federation.env.pop("FLWR_SUPEREXEC_TASK_POLL_INTERVAL")
    else:
        federation.env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = superexec_poll
    watch = ProcessWatch()
    watch.start()
    try:
        federation.start_superlink()
        for pid in range(nodes):
            federation.start_supernode(f"supernode{pid}", f"partition-id={pid} num-partitions={nodes}")
        result = federation.flwr("run", str(ROOT), "loopback", "--stream", "--run-config",
                                 f"{overrides} run-name='deployed' results-dir='{out}'", timeout=3600)
        if result.returncode != 0:
            raise RuntimeError(result.stdout[-3000:] + result.stderr[-3000:])
    finally:
        federation.stop()
        watch.done.set()
    result = per_step(out / "deployed", "step_compute_s")
    steps = json.loads((out / "deployed" / "summary.json").read_text())["inner_steps"]
    for role, (cpu, peak) in watch.by_role().items():
        result[f"{role} cpu_s"], result[f"{role} peak_rss"] = cpu / steps, peak
    return result


def print_processes(result: dict[str, float]) -> None:
    print("  per inner step, CPU s / peak RSS of one process: " + ", ".join(
        f"{role} {result[f'{role} cpu_s']:.2f} s / {result[f'{role} peak_rss'] / 2**30:.2f} GiB"
        for role in ROLES if f"{role} cpu_s" in result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--run-config", default=DEFAULT)
    parser.add_argument("--large-blocks", action="store_true", help="run-config LARGE_BLOCKS (6-layer blocks)")
    parser.add_argument("--variants", nargs="*", type=int, metavar="ROW",
                        help="deployment only, once per setting in VARIANTS (all, or the rows numbered from 0)")
    args = parser.parse_args()
    if args.large_blocks:
        args.run_config = LARGE_BLOCKS
    overrides = f"num-nodes={args.nodes} {args.run_config}"
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores; run-config: {overrides}")
    out = Path(tempfile.mkdtemp(prefix="engine-overhead-"))
    start = time.time()
    if args.variants is not None:
        for i, variant in enumerate(VARIANTS):
            if args.variants and i not in args.variants:
                continue
            r = deployment(overrides, args.nodes, out / f"deployment{i}", variant)
            print(f"deployment, {variant}: {r['wall']:.3f} s per inner step = {r['compute']:.3f} s fwd+bwd+Adam "
                  f"+ {r['overhead']:.3f} s overhead ({r['visits']} visits)", flush=True)
            print_processes(r)
        print(f"total {time.time() - start:.0f} s")
        shutil.rmtree(out)  # the nodes' checkpoints, GBs; kept when a run failed
        return
    sim = simulation(overrides, args.nodes, out / "simulation")
    dep = deployment(overrides, args.nodes, out / "deployment")
    for name, r in (("simulation", sim), ("deployment", dep)):
        print(f"{name}: {r['wall']:.3f} s per inner step = {r['compute']:.3f} s fwd+bwd+Adam (critical path) "
              f"+ {r['overhead']:.3f} s overhead ({r['visits']} visits)")
    print_processes(dep)
    print(f"deployment / simulation per inner step: {dep['wall'] / sim['wall']:.3f} (goal <= 1.3); "
          f"overhead {dep['overhead']:.3f} s vs {sim['overhead']:.3f} s; total {time.time() - start:.0f} s")
    shutil.rmtree(out)  # the nodes' checkpoints, GBs; kept when a run failed


if __name__ == "__main__":
    main()
