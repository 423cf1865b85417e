"""`deca-flower plan` next to what finished runs measured: bytes sent per node over the whole run,
peak optimizer+grad bytes per node, and train messages.

    python bench/plan_vs_runs.py results/main results/bbc-small/runs/* [results/topology/runs/*]
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from omegaconf import OmegaConf

from deca_flower.config import DecaConfig
from deca_flower.plan import make_plan

PLANNED = ("deca", "deca-nobma", "deca-trivial", "fedavg")  # the plan models DECA blocks and FedAvg's full model


def main() -> None:
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores")
    print("| run | method | bytes / node: plan | measured | ratio | peak opt+grad / node: plan | measured | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    gib, mib = 2**30, 2**20
    for folder in map(Path, sys.argv[1:]):
        if not (folder / "summary.json").is_file():
            continue
        summary = json.loads((folder / "summary.json").read_text())
        cfg = DecaConfig.from_run_config(OmegaConf.to_container(OmegaConf.load(folder / "config.yaml")))
        if cfg.method not in PLANNED:
            print(f"| {folder} | {cfg.method} | not modelled by the plan | | | | | |")
            continue
        plan = make_plan(cfg)
        fedavg = cfg.method == "fedavg"
        bytes_plan = plan.fedavg_bytes_per_node_run if fedavg else plan.bytes_per_node_run
        opt_plan = plan.full_adam_optimizer_bytes if fedavg else plan.deca_optimizer_bytes
        bytes_run, opt_run = summary["bytes_sent_per_node"], summary["peak_optimizer_bytes_per_node"]
        print(f"| {folder} | {cfg.method} | {bytes_plan / gib:.3f} GiB | {bytes_run / gib:.3f} GiB | "
              f"{bytes_run / bytes_plan:.3f} | {opt_plan / mib:.1f} MiB | {opt_run / mib:.1f} MiB | {opt_run / opt_plan:.3f} |")


if __name__ == "__main__":
    main()
