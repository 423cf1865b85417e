"""An experiment's results page: README.md (tables + commands), results.json and plots.

One seed per run: a row per run, mean +- std over nodes. Several seeds (a study): a row per
variant with mean +- sample std over seeds, the worst node, and the paired difference to the
baseline (same setting, same seed) with a 95 % t-interval, bytes sent and train time per step; plots
of accuracy vs step with bands over seeds, of accuracy vs the BMA strength, and of accuracy vs the
bytes sent where the variants send different amounts (compression).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy import stats

from deca_flower.results import plt

MIB = 2**20


@dataclass(frozen=True)
class PlannedRun:
    """One run of an experiment: a variant (label) in a setting, for one seed."""

    key: str  # its folder under <experiment>/runs/ and its key in results.json
    label: str
    setting: str
    seed: int | None
    engine: str
    values: dict[str, Any]  # the run-config, placement included


def write_report(spec: dict[str, Any], planned: list[PlannedRun], summaries: dict[str, dict[str, Any]],
                 out_dir: Path) -> None:
    done = [r for r in planned if r.key in summaries]
    ordered = {r.key: summaries[r.key] for r in done}
    (out_dir / "results.json").write_text(json.dumps(ordered, indent=2))
    if any(r.seed is not None for r in planned):
        write_study(spec, done, ordered, out_dir)
    else:
        write_comparison(spec, ordered, out_dir)


def records_of(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The run's metrics.jsonl lines of one kind ("eval", "visit")."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# -- one seed per run ---------------------------------------------------------------------------

def write_comparison(spec: dict[str, Any], summaries: dict[str, dict[str, Any]], out_dir: Path) -> None:
    name = Path(spec["_path"]).stem
    first, second = headline = tuple(next(iter(summaries.values())).get("headline", ("accuracy", "macro_f1")))
    rows = [f"| run | method | topology (spectral gap) | {first} | {second} | bytes sent / node | peak opt+grad / node | "
            "wall s | inner steps |", "|---|---|---|---|---|---|---|---|---|"]
    for label, s in summaries.items():
        f = s["final"]
        gap = f" ({s['spectral_gap']:.3f})" if "spectral_gap" in s else ""
        scores = " | ".join(f"{f[k + '_mean']:.3f} +- {f[k + '_std']:.3f}" for k in headline)
        rows.append(f"| {label} | {s['method']} | {s['topology']}{gap} | {scores} | {s['bytes_sent_per_node'] / MIB:,.0f} MiB "
                    f"| {s.get('peak_optimizer_bytes_per_node', 0) / MIB:,.0f} MiB | {s['wall_time_s']:.0f} "
                    f"| {s['inner_steps']} |")
    initial = next((s["initial"] for s in summaries.values() if s.get("initial")), None)
    text = [f"# {name}", "", f"Regenerate: `deca-flower compare {spec['_path']}`", ""]
    if initial:
        text += [f"Untrained model: {first} {initial[first]:.3f}, {second} {initial[second]:.3f}.", ""]
    text += rows + ["", f"{first} and {second}: mean +- std over nodes (population) on the held-out split, after the "
                    "last step.", "", "## Commands", ""]
    text += [f"- {label}: `{s['command']}`" for label, s in summaries.items()]
    samples = [label for label in summaries if (out_dir / "runs" / label / "samples.md").is_file()]
    if samples:
        text += ["", "Generated samples: " + ", ".join(f"[{label}](runs/{label}/samples.md)" for label in samples)]
    text += ["", f"![{first} vs step]({first}_vs_step.png) ![{first} vs bytes]({first}_vs_bytes.png) "
             "![consensus](consensus_vs_step.png)", ""]
    (out_dir / "README.md").write_text("\n".join(text))
    for x_key, x_label, file in (("step", "inner step", f"{first}_vs_step.png"),
                                 ("bytes_sent_per_node", "MiB sent per node", f"{first}_vs_bytes.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in summaries:
            evals = records_of(out_dir / "runs" / label, "eval")
            xs = [e[x_key] / (MIB if x_key != "step" else 1) for e in evals]
            ax.plot(xs, [e[f"{first}_mean"] for e in evals], marker="o", label=label)
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"mean held-out {first}")
        if x_key != "step":
            ax.set_xscale("symlog")
        ax.grid(alpha=0.3)
        ax.legend()
        _save(fig, out_dir / file)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in summaries:
        visits = records_of(out_dir / "runs" / label, "visit")
        if visits:
            ax.plot([v["step"] for v in visits], [v["consensus_distance"] for v in visits], marker=".", label=label)
    ax.set_xlabel("inner step")
    ax.set_ylabel("consensus distance")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.lines:  # FedAvg-only comparisons relay no blocks
        ax.legend()
    _save(fig, out_dir / "consensus_vs_step.png")


# -- several seeds: a study ---------------------------------------------------------------------

def run_figures(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """What the study reports of one run (headline metric = summary["headline"][0])."""
    key, second = summary["headline"]
    final = summary["final"]
    visits = records_of(run_dir, "visit")
    evals = records_of(run_dir, "eval")
    return {
        "score": final[f"{key}_mean"], "second": final[f"{second}_mean"], "worst": min(final[f"{key}_per_node"]),
        "spread": final[f"{key}_std"], "loss": visits[-1]["loss_mean"] if visits else math.nan,
        "consensus": summary.get("final_consensus_distance", math.nan), "wall": summary["wall_time_s"],
        "mib": summary["bytes_sent_per_node"] / MIB,
        "step_s": summary.get("train_s", math.nan) / max(summary.get("inner_steps", 0), 1),
        "code": summary.get("code", "unknown"), "machine": summary.get("machine", "not recorded"),
        "curve": [(e["step"], e[f"{key}_mean"], min(e[f"{key}_per_node"])) for e in evals],
    }


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); sd is nan for one value."""
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
    return mean, sd


def paired(values: dict[int, float], baseline: dict[int, float]) -> tuple[float, float, float, int] | None:
    """Mean of value - baseline over the seeds both have, with its 95 % t-interval (None below 2 pairs)."""
    seeds = sorted(set(values) & set(baseline))
    if len(seeds) < 2:
        return None
    diffs = [values[s] - baseline[s] for s in seeds]
    mean, sd = mean_sd(diffs)
    half = stats.t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return mean, mean - half, mean + half, len(diffs)


def _points(interval: tuple[float, float, float, int] | None) -> str:
    if interval is None:
        return ""
    mean, low, high, n = interval
    return f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] (n={n})"


def _overrides(spec: dict[str, Any], label: str) -> str:
    run = next(r for r in spec["runs"] if r["label"] == label)
    return " ".join(f"{k}={v}" for k, v in run.items() if k not in ("label", "seeds", "settings", "engine")) or "-"


def write_study(spec: dict[str, Any], runs: list[PlannedRun], summaries: dict[str, dict[str, Any]], out_dir: Path) -> None:
    name = Path(spec["_path"]).stem
    figures = {r.key: run_figures(out_dir / "runs" / r.key, summaries[r.key]) for r in runs}
    headline = next(iter(summaries.values()))["headline"]
    key, second = headline
    baseline = spec.get("baseline")
    codes = sorted({f["code"] for f in figures.values()})
    engines = sorted({summaries[r.key].get("engine", "flwr") for r in runs})
    machines = sorted({f["machine"] for f in figures.values()})
    text = [f"# {name}", "", f"Regenerate (finished runs are skipped): `deca-flower compare {spec['_path']}`", "",
            f"Engine: {', '.join(engines)}. Code: {', '.join(codes)}"
            + (" (rows come from different commits)" if len(codes) > 1 else " (every row from this commit)")
            + f". Machine: {'; '.join(machines)}.", ""]
    for setting in dict.fromkeys(r.setting for r in runs):
        in_setting = [r for r in runs if r.setting == setting]
        by_label: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
        for r in in_setting:
            by_label[r.label][r.seed] = figures[r.key]
        config = next((s.get("config", {}) for s in spec.get("settings", []) if s["name"] == setting), {})
        title = setting or name
        text += [f"## {title}", "", f"Run config: `{' '.join(f'{k}={v}' for k, v in {**spec['config'], **config}.items())}`",
                 ""]
        base = {s: f["score"] for s, f in by_label.get(baseline, {}).items()}
        base_worst = {s: f["worst"] for s, f in by_label.get(baseline, {}).items()}
        text += [f"| variant | overrides | seeds | {key} | worst node | {second} | std over nodes | "
                 f"Δ {key} vs {baseline} [95% CI] | Δ worst node vs {baseline} [95% CI] | consensus distance | train loss | "
                 "MiB sent / node | train s / step |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, per_seed in by_label.items():
            f = list(per_seed.values())

            def cell(field: str, f: list[dict[str, Any]] = f) -> str:
                mean, sd = mean_sd([x[field] for x in f])
                return f"{mean:.3f} +- {sd:.3f}" if not math.isnan(sd) else f"{mean:.3f}"

            def average(field: str, f: list[dict[str, Any]] = f) -> float:
                return mean_sd([x[field] for x in f])[0]

            vs = paired({s: x["score"] for s, x in per_seed.items()}, base) if baseline and label != baseline else None
            vs_worst = (paired({s: x["worst"] for s, x in per_seed.items()}, base_worst)
                        if baseline and label != baseline else None)
            text.append(f"| {label} | {_overrides(spec, label)} | {len(f)} | {cell('score')} | {cell('worst')} | "
                        f"{cell('second')} | {average('spread'):.3f} | {_points(vs)} | {_points(vs_worst)} | "
                        f"{average('consensus'):.3g} | {average('loss'):.3f} | {average('mib'):,.0f} | "
                        f"{average('step_s'):.2f} |")
        text += ["", f"Per run, {key} and {second} are the mean over nodes on the whole held-out split after the last "
                 "step, worst node the lowest node's, std over nodes the population std; the table gives mean +- sample "
                 f"std over seeds. Δ: paired difference to `{baseline}` on the same seed (same split, graph and "
                 "minibatches), in points, with a 95 % t-interval. Consensus distance: mean over nodes of "
                 "||x_i - mean x||^2 over all parameters at the end; train loss: mean over the last visit's steps and "
                 "nodes. MiB sent / node: over the run, what the fast path counts as Flower would send; train s / step: "
                 "the run's wall time less evaluation, over its inner steps (all nodes in one process, so it "
                 "compares variants only when their runs shared the machine alike).", ""]
        prefix = f"{setting}_" if setting else ""
        images = []
        if plot_curves(by_label, headline, out_dir / f"{prefix}{key}_vs_step.png", title):
            images.append(f"![{key} vs step]({prefix}{key}_vs_step.png)")
        if plot_strength(spec, by_label, key, baseline, out_dir / f"{prefix}{key}_vs_strength.png", title):
            images.append(f"![{key} vs strength]({prefix}{key}_vs_strength.png)")
        if plot_bytes(by_label, key, out_dir / f"{prefix}{key}_vs_bytes.png", title):
            images.append(f"![{key} vs bytes]({prefix}{key}_vs_bytes.png)")
        text += [" ".join(images), ""]
    text += ["## Every run", "", f"| run | {key} | worst node | {second} | std over nodes | consensus distance | "
             "train loss | wall s | code |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        f = figures[r.key]
        text.append(f"| {r.key} | {f['score']:.3f} | {f['worst']:.3f} | {f['second']:.3f} | {f['spread']:.3f} | "
                    f"{f['consensus']:.3g} | {f['loss']:.3f} | {f['wall']:.0f} | {f['code']} |")
    text += ["", "## Commands", ""] + [f"- {r.key}: `{summaries[r.key]['command']}`" for r in runs] + [""]
    (out_dir / "README.md").write_text("\n".join(text))


def plot_curves(by_label: dict[str, dict[int, dict[str, Any]]], headline: list[str], path: Path, title: str) -> bool:
    """Mean over nodes and worst node against the inner step: mean over seeds, band = +- sample std. Only
    where some run was evaluated more than once (False: no plot)."""
    if all(len(f["curve"]) < 2 for per_seed in by_label.values() for f in per_seed.values()):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for label, per_seed in by_label.items():
        curves = [f["curve"] for f in per_seed.values()]
        steps = [step for step, _, _ in curves[0]]
        if any([s for s, _, _ in c] != steps for c in curves):
            continue  # seeds evaluated at different steps: no common curve
        for ax, column in zip(axes, (1, 2)):
            columns = [[point[column] for point in c] for c in curves]
            stats_at = [mean_sd([c[i] for c in columns]) for i in range(len(steps))]
            means = [m for m, _ in stats_at]
            sds = [0.0 if math.isnan(sd) else sd for _, sd in stats_at]
            line, = ax.plot(steps, means, marker="o", label=f"{label} ({len(curves)})")
            ax.fill_between(steps, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)],
                            color=line.get_color(), alpha=0.12)
    _label_panels(axes, "inner step", headline[0])
    axes[1].legend(fontsize=7, title="variant (seeds)", title_fontsize=7)
    fig.suptitle(f"{title}: mean over seeds, band = +- sample std")
    _save(fig, path)
    return True


def plot_strength(spec: dict[str, Any], by_label: dict[str, dict[int, dict[str, Any]]], key: str,
                  baseline: str | None, path: Path, title: str) -> bool:
    """Accuracy against bma-strength for the gradient-unit variants (others as horizontal lines)."""
    runs = {r["label"]: r for r in spec["runs"]}
    knob = sorted((float(runs[label]["bma-strength"]), label) for label in by_label
                  if "bma-strength" in runs[label] and runs[label].get("bma", spec["config"].get("bma")) != "trivial")
    if len(knob) < 2:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, field in zip(axes, ("score", "worst")):
        points = [(s, mean_sd([f[field] for f in by_label[label].values()])) for s, label in knob]
        ax.errorbar([s for s, _ in points], [m for _, (m, _) in points],
                    yerr=[0.0 if math.isnan(sd) else sd for _, (_, sd) in points], marker="o", capsize=3,
                    label="discrepancy=gradient")
        for label in [baseline, "scaled"]:
            if label in by_label and label not in {lb for _, lb in knob}:
                ax.axhline(mean_sd([f[field] for f in by_label[label].values()])[0], linestyle="--", alpha=0.6,
                           color="gray" if label == baseline else "tab:red", label=label)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.legend(fontsize=8)
    _label_panels(axes, "bma-strength s", key)
    fig.suptitle(f"{title}: mean +- sample std over seeds")
    _save(fig, path)
    return True


def plot_bytes(by_label: dict[str, dict[int, dict[str, Any]]], key: str, path: Path, title: str) -> bool:
    """Accuracy against MiB sent per node, one point per variant; only where variants send different
    amounts on the same seed (seeds differ in their graph, hence in bytes)."""
    on_seed = defaultdict(list)
    for per_seed in by_label.values():
        for seed, f in per_seed.items():
            on_seed[seed].append(f["mib"])
    if all(max(sent) <= 1.01 * min(sent) for sent in on_seed.values()):
        return False
    sent = {label: mean_sd([f["mib"] for f in per_seed.values()])[0] for label, per_seed in by_label.items()}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, field in zip(axes, ("score", "worst")):
        for label, per_seed in by_label.items():
            mean, sd = mean_sd([f[field] for f in per_seed.values()])
            ax.errorbar([sent[label]], [mean], yerr=[0.0 if math.isnan(sd) else sd], marker="o", capsize=3,
                        label=f"{label} ({len(per_seed)})")
        ax.set_xscale("log")
    _label_panels(axes, "MiB sent per node over the run", key)
    axes[1].legend(fontsize=8, title="variant (seeds)", title_fontsize=8)
    fig.suptitle(f"{title}: mean +- sample std over seeds")
    _save(fig, path)
    return True


def _label_panels(axes: Any, xlabel: str, key: str) -> None:
    """The two panels of a study plot: the mean over nodes (left) and the worst node (right)."""
    for ax, what in zip(axes, ("mean over nodes", "worst node")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"held-out {key}, {what}")
        ax.grid(alpha=0.3)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
