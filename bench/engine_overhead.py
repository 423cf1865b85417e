"""Per-inner-step overhead in Flower's two engines, same job, same seed:

- simulation: `flwr run . --federation-config "num-supernodes=N"` with the default resources (2 CPUs
  per node: on this 2-core machine one Ray actor runs the nodes one after another);
- deployment: a local flower-superlink + N flower-supernodes on 127.0.0.1 (`flwr run . loopback`),
  each node served by its warm worker, one core each (OMP_NUM_THREADS=1), side by side.

Per inner step the coordinator records the wall time of the message round and each node's
forward + backward + Adam time. Overhead = wall - compute on the critical path: the sum over nodes
when they run one after another (simulation), the slowest node when they run side by side
(deployment); it is message passing, (de)serialising, mixing and bookkeeping. The first visit is
left out (warm-up).

`--variants` runs only the deployment, once per row of VARIANTS, to show what each setting
costs, from Flower's defaults to deca_flower's: the SuperLink's state in SQLite (`--database`)
or in memory; Flower's fixed polling naps or 0.25 s polls; a `flwr-clientapp` process per
message (handing it to the warm worker) or the in-process task runner.

    python bench/engine_overhead.py [--nodes 2] [--run-config "..."] [--variants]
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
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.loopback import Loopback  # noqa: E402

DEFAULT = ("topology='complete' embeddings='frozen' layers-per-block=6 steps-per-block=4 eval-initial=false "
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


# deployment settings, Flower's defaults first, each row adding one change; the last row is what
# tests/loopback.py and docker/ use
FLOWER_SUPERNODE = ("flower-supernode", ())
PER_MESSAGE = ("deca-flower-supernode", ("--task-runner", "per-message"))
VARIANTS = {
    "flower defaults (SQLite state, 3 s / 1 s naps, process per message)": (True, FLOWER_SUPERNODE, None),
    "+ in-memory SuperLink state": (False, FLOWER_SUPERNODE, None),
    "+ 0.25 s polls (deca-flower-supernode --task-runner per-message)": (False, PER_MESSAGE, "0.25"),
    "+ in-process task runner (deca-flower-supernode)": (False, ("deca-flower-supernode", ()), "0.25"),
}
DECA_DEFAULT = list(VARIANTS)[-1]


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
    try:
        federation.start_superlink()
        for pid in range(nodes):
            federation.start_supernode(f"supernode{pid}", f"partition-id={pid} num-partitions={nodes} "
                                       f"worker-socket='{out / f'w{pid}.sock'}' warm-worker-idle-s=60")
        result = federation.flwr("run", str(ROOT), "loopback", "--stream", "--run-config",
                                 f"{overrides} run-name='deployed' results-dir='{out}'", timeout=3600)
        if result.returncode != 0:
            raise RuntimeError(result.stdout[-3000:] + result.stderr[-3000:])
    finally:
        for pid_file in out.glob("w*.pid"):
            os.kill(int(pid_file.read_text()), 15)
        federation.stop()
    return per_step(out / "deployed", "step_compute_s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--run-config", default=DEFAULT)
    parser.add_argument("--variants", action="store_true", help="deployment only, once per setting in VARIANTS")
    args = parser.parse_args()
    overrides = f"num-nodes={args.nodes} {args.run_config}"
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores; run-config: {overrides}")
    out = Path(tempfile.mkdtemp(prefix="engine-overhead-"))
    start = time.time()
    if args.variants:
        for i, variant in enumerate(VARIANTS):
            r = deployment(overrides, args.nodes, out / f"deployment{i}", variant)
            print(f"deployment, {variant}: {r['wall']:.3f} s per inner step = {r['compute']:.3f} s fwd+bwd+Adam "
                  f"+ {r['overhead']:.3f} s overhead ({r['visits']} visits)", flush=True)
        print(f"total {time.time() - start:.0f} s")
        shutil.rmtree(out)  # the nodes' checkpoints, GBs; kept when a run failed
        return
    sim = simulation(overrides, args.nodes, out / "simulation")
    dep = deployment(overrides, args.nodes, out / "deployment")
    for name, r in (("simulation", sim), ("deployment", dep)):
        print(f"{name}: {r['wall']:.3f} s per inner step = {r['compute']:.3f} s fwd+bwd+Adam (critical path) "
              f"+ {r['overhead']:.3f} s overhead ({r['visits']} visits)")
    print(f"deployment / simulation per inner step: {dep['wall'] / sim['wall']:.3f} (goal <= 1.3); "
          f"overhead {dep['overhead']:.3f} s vs {sim['overhead']:.3f} s; total {time.time() - start:.0f} s")
    shutil.rmtree(out)  # the nodes' checkpoints, GBs; kept when a run failed


if __name__ == "__main__":
    main()
