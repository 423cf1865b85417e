"""Run an experiment's runs one after another and write its report (deca_flower/report.py).

    deca-flower compare conf/experiments/bbc-small.yaml [--only deca,fedavg] [--rerun] [--plots-only]

An experiment file has `config` (run-config keys shared by every run) and `runs` (a list of
overrides, each with a `label`), and optionally:
- `engine`: `flwr` (default: a real `flwr run . --stream` on the simulation engine) or
  `reference-fast` (`deca-flower reference --fast`: the same math in one process, for sweeps);
  a run may name its own;
- `seeds`: every run is repeated for each seed (seed = split, graph draw, minibatch order); a run
  may list its own `seeds` (e.g. more for the variants that decide a default);
- `settings`: named config overlays ({name, config}, optionally `seeds`: the only seeds run in that
  setting); every run is repeated in each, unless it lists the `settings` it belongs to;
- `baseline`: the label that the report pairs every other run with (same setting, same seed);
- `num-supernodes` for flwr runs.

A run folder that already holds a summary for the same config is skipped (`--rerun` runs it
again), so a long experiment can be built in parts; a failed run is reported at the end and
loses no earlier result.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from deca_flower.config import DecaConfig
from deca_flower.report import PlannedRun, write_report

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("flwr", "reference-fast")
RUN_KEYS = {"label", "seeds", "settings", "engine"}  # keys of a run that are not run-config
# the first default of a key whose default has changed since it was added to DecaConfig
FIRST_DEFAULTS = {"bma-strength": 1.0}
PLACEMENT = {"results-dir", "run-name", "state-dir", "overwrite"}  # where a run writes: not what it computes


def run_config_string(values: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return f"'{v}'" if isinstance(v, str) else repr(v)
    return " ".join(f"{k}={fmt(v)}" for k, v in values.items())


def load_experiment(path: Path) -> dict[str, Any]:
    """The experiment spec, with every run's config validated before anything starts."""
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    for key in ("config", "runs"):
        if key not in spec:
            raise ValueError(f"experiment {path} lacks '{key}'")
    labels = [r.get("label") for r in spec["runs"]]
    if None in labels or len(set(labels)) != len(labels):
        raise ValueError(f"experiment {path}: every run needs a distinct label, got {labels}")
    names = [s.get("name") for s in spec.get("settings", [])]
    if None in names or len(set(names)) != len(names):
        raise ValueError(f"experiment {path}: every setting needs a distinct name, got {names}")
    if spec.get("baseline") and spec["baseline"] not in labels:
        raise ValueError(f"experiment {path}: baseline '{spec['baseline']}' is not a run label")
    spec["_path"] = str(path)
    for run in plan_runs(spec, ROOT / "results" / Path(path).stem):
        if run.engine not in ENGINES:
            raise ValueError(f"experiment {path}: run {run.key} has engine '{run.engine}', not one of {list(ENGINES)}")
        if run.engine == "reference-fast" and run.values.get("method") == "fedavg":
            raise ValueError(f"experiment {path}: run {run.key}: method fedavg runs Flower's strategy, engine flwr only")
        DecaConfig.from_run_config(run.values)
    return spec


def plan_runs(spec: dict[str, Any], out_dir: Path) -> list[PlannedRun]:
    """Every run of the experiment: settings in order, then seeds, then the runs in file order."""
    settings = spec.get("settings") or [{"name": "", "config": {}}]
    planned = []
    for setting in settings:
        name = setting["name"]
        runs = [r for r in spec["runs"] if not name or name in r.get("settings", [name])]
        allowed = setting.get("seeds")
        seeds_of = {r["label"]: [s for s in r.get("seeds", spec.get("seeds", [None])) if allowed is None or s in allowed]
                    for r in runs}
        for seed in sorted({s for seeds in seeds_of.values() for s in seeds}, key=lambda s: (s is None, s)):
            for run in runs:
                if seed not in seeds_of[run["label"]]:
                    continue
                key = "/".join(p for p in (name, run["label"], None if seed is None else f"seed{seed}") if p)
                values = {**spec["config"], **setting.get("config", {}),
                          **{k: v for k, v in run.items() if k not in RUN_KEYS}}
                if seed is not None:
                    values["seed"] = seed
                run_dir = out_dir / "runs" / key
                values.update({"results-dir": str(run_dir.parent), "run-name": run_dir.name})
                planned.append(PlannedRun(key, run["label"], name, seed, run.get("engine", spec.get("engine", "flwr")),
                                          values))
    return planned


def command_for(spec: dict[str, Any], run: PlannedRun) -> tuple[list[str], str]:
    """The argv for one run, and the same command as a user would type it (paths relative to the project)."""
    run_config = run_config_string(run.values)
    if run.engine == "reference-fast":
        argv = [sys.executable, "-m", "deca_flower.cli", "reference", "--fast", "--run-config", run_config]
        shown = f'deca-flower reference --fast --run-config "{run_config}"'
    else:
        nodes = spec.get("num-supernodes", DecaConfig.from_run_config(run.values).num_nodes)
        federation = f"num-supernodes={nodes}"
        argv = ["flwr", "run", str(ROOT), "--stream", "--run-config", run_config, "--federation-config", federation]
        shown = f'flwr run . --stream --run-config "{run_config}" --federation-config "{federation}"'
    return argv, shown.replace(str(ROOT) + "/", "")


def is_finished(run: PlannedRun, run_dir: Path) -> bool:
    """The folder holds a summary of a run with exactly this config (placement aside). A key the saved
    config lacks was added to DecaConfig after the run, which behaved as the key's first default."""
    if not (run_dir / "summary.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    saved = {**DecaConfig().to_run_config(), **FIRST_DEFAULTS,
             **OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))}
    wanted = DecaConfig.from_run_config(run.values).to_run_config()
    return {k: v for k, v in saved.items() if k not in PLACEMENT} == {k: v for k, v in wanted.items() if k not in PLACEMENT}


def run_one(spec: dict[str, Any], run: PlannedRun, out_dir: Path) -> dict[str, Any]:
    """Run it (its output goes to runs/<key>.log) and return its summary with the command. An earlier
    run in its folder (another config, or --rerun) is replaced: the experiment owns its run folders."""
    run_dir = out_dir / "runs" / run.key
    if (run_dir / "summary.json").is_file() or (run_dir / "checkpoint.json").is_file():
        run = dataclasses.replace(run, values={**run.values, "overwrite": True})
    argv, shown = command_for(spec, run)
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    log_file = run_dir.parent / f"{run_dir.name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("w") as log:
        code = subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0 or not (run_dir / "summary.json").is_file():
        raise RuntimeError(f"{run.key} failed (exit {code}); see {log_file}")
    shutil.rmtree(run_dir / "nodes", ignore_errors=True)  # node checkpoints: GBs, done with
    return {**json.loads((run_dir / "summary.json").read_text()), "command": shown}


def compare(path: str, only: list[str] | None = None, plots_only: bool = False, rerun: bool = False) -> Path:
    spec = load_experiment(Path(path))
    out_dir = ROOT / "results" / Path(path).stem
    out_dir.mkdir(parents=True, exist_ok=True)
    planned = plan_runs(spec, out_dir)
    old = json.loads((out_dir / "results.json").read_text()) if (out_dir / "results.json").is_file() else {}
    # earlier results stay in the report until a run of this call replaces them (a failed run loses nothing)
    summaries = {r.key: {**old[r.key], "command": command_for(spec, r)[1]} for r in planned if r.key in old}
    failures = []
    for i, run in enumerate(planned):
        counter = f"[{i + 1}/{len(planned)}] {run.key}"
        if plots_only or (only and run.label not in only):
            continue
        run_dir = out_dir / "runs" / run.key
        if not rerun and is_finished(run, run_dir):
            summaries[run.key] = {**json.loads((run_dir / "summary.json").read_text()), "command": command_for(spec, run)[1]}
            print(f"{counter}: finished earlier, skipped", flush=True)
            continue
        print(f"{counter}: running", flush=True)
        try:
            summaries[run.key] = s = run_one(spec, run, out_dir)
        except RuntimeError as err:
            print(f"{counter}: {err}", flush=True)
            failures.append(str(err))
            continue
        key = s["headline"][0]
        print(f"{counter}: {key} {s['final'][key + '_mean']:.3f} +- {s['final'][key + '_std']:.3f} "
              f"in {s['wall_time_s']:.0f}s", flush=True)
        write_report(spec, planned, summaries, out_dir)
    if not summaries:
        raise SystemExit(f"no results for {path} yet: run it without --plots-only first")
    write_report(spec, planned, summaries, out_dir)
    print(f"wrote {out_dir / 'README.md'}")
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed: " + "; ".join(failures))
    return out_dir


if __name__ == "__main__":
    compare(sys.argv[1])
