"""A run's results folder: config.yaml, metrics.jsonl, summary.json and plots.

Nothing in it is lost to a careless start: `check_run_folder` (before any node connects) refuses a
fresh start over an earlier run's checkpoint or summary unless overwrite=true, and a resume with no
checkpoint; a RunWriter touches the folder only when the run writes its first record (`start`), so
a run that fails during set-up leaves the folder as it was.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.json"  # the coordinator's record of the last block visit every node saved
SUMMARY = "summary.json"


def code_version() -> str:
    """The git commit of the code that ran ("+changes" if the tree had uncommitted edits), or "unknown"."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "deca_flower"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def machine() -> str:
    """The host that wrote a result, e.g. "x86_64, 2 CPUs, Linux 6.1"."""
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (an earlier run a fresh start would replace, nothing to resume)."""


def check_run_folder(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is moved or any node connects: a fresh start in a folder holding an
    earlier run's checkpoint or summary (unless overwrite), or a resume without a checkpoint."""
    if resume:
        if not (run_dir / CHECKPOINT).is_file():
            others = sorted(p.parent.name for p in run_dir.parent.glob(f"*/{CHECKPOINT}"))
            why = ("the run stopped before every node had saved a block visit: start it again with resume=false"
                   if (run_dir / "config.yaml").is_file() else "there is no run there")
            raise RunFolderError(f"resume=true but {run_dir} holds no {CHECKPOINT} ({why}); run folders with a "
                                 f"checkpoint under {run_dir.parent}: {others or 'none'}")
        return
    held = [name for name in (CHECKPOINT, SUMMARY) if (run_dir / name).is_file()]
    if held and not overwrite:
        raise RunFolderError(f"{run_dir} holds an earlier run ({', '.join(held)}): resume=true continues it, "
                             f"overwrite=true starts afresh (its files move to {run_dir / 'previous'}), "
                             "or choose another run-name")


def _set_aside_earlier_run(run_dir: Path) -> None:
    """A fresh run must neither mix with nor silently destroy what an earlier run left (its
    checkpoint.json would also mislead a later resume); node state (nodes/) is the nodes' to reset."""
    earlier = [f for f in run_dir.iterdir() if f.is_file()]
    if not earlier:
        return
    previous = run_dir / "previous"
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir()
    for file in earlier:
        file.replace(previous / file.name)
    log.warning("%s held an earlier run: its %d files are now in %s", run_dir, len(earlier), previous)


def write_samples(path: Path, per_node: dict[int, list[tuple[str, str]]]) -> Path:
    """Generated answers to held-out prompts, per node, as markdown (the run's, or a site's own copy)."""
    lines = ["# Generated samples (greedy, held-out prompts)", ""]
    for node, pairs in per_node.items():
        lines += [f"## node {node}", ""]
        for prompt, answer in pairs:
            lines += ["```", f"{prompt} {answer}", "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


class RunWriter:
    """keep_lines: continue a resumed run's metrics.jsonl after its first keep_lines records
    (those written by the time of the checkpoint); otherwise start it empty, with the files of an
    earlier run under the same name moved to run_dir/previous/ (replacing an older previous/).

    Reading happens here; the folder is changed only by `start()`, which the first write calls."""

    def __init__(self, run_dir: Path, keep_lines: int | None = None) -> None:
        self.run_dir = run_dir
        self.metrics_file = run_dir / "metrics.jsonl"
        self.keep_lines = keep_lines
        self._kept = self.metrics_file.read_text().splitlines()[:keep_lines] if keep_lines else []
        self.lines = len(self._kept)
        self.evaluations: list[dict[str, Any]] = [e for e in map(json.loads, self._kept) if e.get("kind") == "eval"]
        self.started = False

    def start(self) -> None:
        """The run really begins: set an earlier run's files aside (fresh start) or cut metrics.jsonl back
        to the checkpoint (resume). Once; every write calls it."""
        if self.started:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.keep_lines is None:
            _set_aside_earlier_run(self.run_dir)
        self.metrics_file.write_text("".join(line + "\n" for line in self._kept))
        self.started = True

    def write_config(self, config: dict[str, Any]) -> None:
        self.start()
        OmegaConf.save(OmegaConf.create(config), self.run_dir / "config.yaml")

    def append(self, record: dict[str, Any]) -> None:
        self.start()
        with self.metrics_file.open("a") as out:
            out.write(json.dumps(record) + "\n")
        self.lines += 1
        if record.get("kind") == "eval":
            self.evaluations.append(record)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """summary.json, with the code and the machine that produced it."""
        self.start()
        summary = {"code": code_version(), "machine": machine(), **summary}
        (self.run_dir / SUMMARY).write_text(json.dumps(summary, indent=2))

    def write_samples(self, per_node: dict[int, list[tuple[str, str]]]) -> Path:
        self.start()
        return write_samples(self.run_dir / "samples.md", per_node)

    def plot_headline(self, keys: tuple[str, str], title: str) -> Path:
        """The task's two held-out metrics (mean +- std over nodes) against the inner step."""
        self.start()
        evals = [e for e in self.evaluations if e["nodes"] > 1 or e["step"] == 0]
        steps = [e["step"] for e in evals]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key in zip(axes, keys):
            means = [e[f"{key}_mean"] for e in evals]
            stds = [e[f"{key}_std"] for e in evals]
            ax.errorbar(steps, means, yerr=stds, marker="o", capsize=3)
            ax.set_xlabel("inner step (local Adam step + gossip)")
            ax.set_ylabel(f"held-out {key} (mean +- std over nodes)")
            ax.grid(alpha=0.3)
        fig.suptitle(title)
        path = self.run_dir / f"{keys[0]}.png"  # accuracy.png, response_loss.png
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def plot_label_distribution(partitioner, run_dir: Path, title: str) -> Path:
    """flwr-datasets' own per-partition label plot."""
    from flwr_datasets.visualization import plot_label_distributions

    fig, _, _ = plot_label_distributions(partitioner, label_name="label", plot_type="bar",
                                         size_unit="absolute", legend=True, title=title)
    path = run_dir / "label_distribution.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
