"""Run several methods / settings one after another with `flwr run` and compare them.

    deca-flower compare conf/experiments/bbc-small.yaml [--only deca,fedavg] [--plots-only]

An experiment file has `config` (run-config keys shared by every run), `runs` (a list of
overrides, each with a `label`) and optionally `num-supernodes`. Every run is a real
`flwr run . --stream` (simulation engine); results/<experiment>/ gets README.md (the table, each
row with its exact command), results.json and the plots.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from deca_flower.config import DecaConfig
from deca_flower.results import plt

ROOT = Path(__file__).resolve().parent.parent


def run_config_string(values: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return f"'{v}'" if isinstance(v, str) else repr(v)
    return " ".join(f"{k}={fmt(v)}" for k, v in values.items())


def load_experiment(path: Path) -> dict[str, Any]:
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    for key in ("config", "runs"):
        if key not in spec:
            raise ValueError(f"experiment {path} lacks '{key}'")
    labels = [r.get("label") for r in spec["runs"]]
    if None in labels or len(set(labels)) != len(labels):
        raise ValueError(f"experiment {path}: every run needs a distinct label, got {labels}")
    for run in spec["runs"]:  # validate every run's config before anything starts
        values = {**spec["config"], **{k: v for k, v in run.items() if k != "label"}}
        DecaConfig.from_run_config(values)
    return spec


def command_for(spec: dict[str, Any], run: dict[str, Any], out_dir: Path) -> tuple[list[str], str]:
    """The `flwr run` argv for one run, and the same command as a user would type it."""
    values = {**spec["config"], **{k: v for k, v in run.items() if k != "label"}}
    values.update({"results-dir": str(out_dir / "runs"), "run-name": run["label"]})
    nodes = spec.get("num-supernodes", DecaConfig.from_run_config(values).num_nodes)
    run_config, federation = run_config_string(values), f"num-supernodes={nodes}"
    argv = ["flwr", "run", str(ROOT), "--stream", "--run-config", run_config, "--federation-config", federation]
    shown = f'flwr run . --stream --run-config "{run_config}" --federation-config "{federation}"'
    return argv, shown.replace(str(ROOT) + "/", "")


def run_one(name: str, spec: dict[str, Any], run: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    cmd, shown = command_for(spec, run, out_dir)
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    log_file = out_dir / "runs" / f"{run['label']}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("w") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    summary_file = out_dir / "runs" / run["label"] / "summary.json"
    if code != 0 or not summary_file.is_file():
        raise RuntimeError(f"{name}/{run['label']} failed (exit {code}); see {log_file}")
    summary = json.loads(summary_file.read_text())
    shutil.rmtree(out_dir / "runs" / run["label"] / "nodes", ignore_errors=True)  # node checkpoints: GBs, done with
    summary["command"] = shown
    return summary


def records_of(out_dir: Path, label: str, kind: str) -> list[dict[str, Any]]:
    """The run's metrics.jsonl lines of one kind ("eval", "visit")."""
    lines = (out_dir / "runs" / label / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def headline_of(summaries: dict[str, dict[str, Any]]) -> tuple[str, str]:
    return tuple(next(iter(summaries.values())).get("headline", ("accuracy", "macro_f1")))  # type: ignore[return-value]


def write_report(name: str, spec: dict[str, Any], summaries: dict[str, dict[str, Any]], out_dir: Path) -> None:
    mib = 2**20
    first, second = headline = headline_of(summaries)
    rows = [f"| run | method | topology (spectral gap) | {first} | {second} | bytes sent / node | peak opt+grad / node | "
            "wall s | inner steps |", "|---|---|---|---|---|---|---|---|---|"]
    for label, s in summaries.items():
        f = s["final"]
        gap = f" ({s['spectral_gap']:.3f})" if "spectral_gap" in s else ""
        scores = " | ".join(f"{f[k + '_mean']:.3f} +- {f[k + '_std']:.3f}" for k in headline)
        rows.append(f"| {label} | {s['method']} | {s['topology']}{gap} | {scores} | {s['bytes_sent_per_node'] / mib:,.0f} MiB "
                    f"| {s.get('peak_optimizer_bytes_per_node', 0) / mib:,.0f} MiB | {s['wall_time_s']:.0f} "
                    f"| {s['inner_steps']} |")
    initial = next((s["initial"] for s in summaries.values() if s.get("initial")), None)
    text = [f"# {name}", "", f"Regenerate: `deca-flower compare {spec['_path']}`", ""]
    if initial:
        text += [f"Untrained model: {first} {initial[first]:.3f}, {second} {initial[second]:.3f}.", ""]
    text += rows + ["", f"{first} and {second}: mean +- std over nodes on the held-out split, after the last step.",
                    "", "## Commands", ""]
    text += [f"- {label}: `{s['command']}`" for label, s in summaries.items()]
    samples = [label for label in summaries if (out_dir / "runs" / label / "samples.md").is_file()]
    if samples:
        text += ["", "Generated samples: " + ", ".join(f"[{label}](runs/{label}/samples.md)" for label in samples)]
    text += ["", f"![{first} vs step]({first}_vs_step.png) ![{first} vs bytes]({first}_vs_bytes.png) "
             "![consensus](consensus_vs_step.png)", ""]
    (out_dir / "README.md").write_text("\n".join(text))
    (out_dir / "results.json").write_text(json.dumps(summaries, indent=2))
    for x_key, x_label, file in (("step", "inner step", f"{first}_vs_step.png"),
                                 ("bytes_sent_per_node", "MiB sent per node", f"{first}_vs_bytes.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in summaries:
            evals = records_of(out_dir, label, "eval")
            xs = [e[x_key] / (mib if x_key != "step" else 1) for e in evals]
            ax.plot(xs, [e[f"{first}_mean"] for e in evals], marker="o", label=label)
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"mean held-out {first}")
        if x_key != "step":
            ax.set_xscale("symlog")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / file, dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in summaries:
        visits = records_of(out_dir, label, "visit")
        if visits:
            ax.plot([v["step"] for v in visits], [v["consensus_distance"] for v in visits], marker=".", label=label)
    ax.set_xlabel("inner step")
    ax.set_ylabel("consensus distance of relayed blocks")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.lines:  # FedAvg-only comparisons relay no blocks
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "consensus_vs_step.png", dpi=120)
    plt.close(fig)


def in_spec_order(spec: dict[str, Any], summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["label"]: summaries[r["label"]] for r in spec["runs"] if r["label"] in summaries}


def compare(path: str, only: list[str] | None = None, plots_only: bool = False) -> Path:
    spec = load_experiment(Path(path))
    spec["_path"] = path
    name = Path(path).stem
    out_dir = ROOT / "results" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    old = json.loads((out_dir / "results.json").read_text()) if (out_dir / "results.json").is_file() else {}
    # earlier results stay in the report until a run of this call replaces them (a failed run loses nothing)
    summaries = {r["label"]: {**old[r["label"]], "command": command_for(spec, r, out_dir)[1]}
                 for r in spec["runs"] if r["label"] in old}
    for i, run in enumerate(spec["runs"]):
        label = run["label"]
        if plots_only or (only and label not in only):
            continue
        print(f"[{i + 1}/{len(spec['runs'])}] {name}/{label}: running", flush=True)
        summaries[label] = s = run_one(name, spec, run, out_dir)
        key = headline_of({label: s})[0]
        print(f"[{i + 1}/{len(spec['runs'])}] {name}/{label}: {key} {s['final'][key + '_mean']:.3f} "
              f"+- {s['final'][key + '_std']:.3f} in {s['wall_time_s']:.0f}s", flush=True)
        write_report(name, spec, in_spec_order(spec, summaries), out_dir)
    if not summaries:
        raise SystemExit(f"no results for {path} yet: run it without --plots-only first")
    write_report(name, spec, in_spec_order(spec, summaries), out_dir)
    print(f"wrote {out_dir / 'README.md'}")
    return out_dir


if __name__ == "__main__":
    compare(sys.argv[1])
