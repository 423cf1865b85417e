"""A study's results page: paired intervals against the baseline, bytes and time columns, the plots."""

import json
import math

from scipy import stats

from deca_flower.compare import plan_runs
from deca_flower.report import write_report

SEEDS = [0, 1, 2]
ACCURACY = {"none": [0.80, 0.70, 0.90], "int4": [0.81, 0.69, 0.93]}


def study(tmp_path, sent_mib, int4_seeds=SEEDS, eval_steps=(3, 6)):
    """A fake finished study of two variants over three seeds, evaluated after eval_steps; sent_mib: MiB sent
    per node per variant on seed 0 (seed k sends k + 1 times as much: seeds differ in their graph)."""
    spec = {"_path": "conf/experiments/codecs.yaml", "baseline": "none", "seeds": SEEDS, "config": {"lr": 1e-4},
            "runs": [{"label": "none", "compression": "none"}, {"label": "int4", "compression": "int4", "seeds": int4_seeds}]}
    out_dir = tmp_path / "codecs"
    planned = plan_runs(spec, out_dir)
    summaries = {}
    for run in planned:
        accuracy = ACCURACY[run.label][run.seed]
        per_node = [accuracy - 0.05, accuracy + 0.05]
        run_dir = out_dir / "runs" / run.key
        run_dir.mkdir(parents=True)
        lines = [{"kind": "visit", "step": 6, "loss_mean": 0.5, "consensus_distance": 0.1}]
        lines += [{"kind": "eval", "step": step, "accuracy_mean": accuracy, "accuracy_per_node": per_node}
                  for step in eval_steps]
        (run_dir / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
        summaries[run.key] = {
            "headline": ["accuracy", "macro_f1"], "engine": "reference-fast", "code": "abc1234", "machine": "test",
            "final": {"accuracy_mean": accuracy, "accuracy_per_node": per_node, "accuracy_std": 0.05,
                      "macro_f1_mean": accuracy - 0.1},
            "final_consensus_distance": 0.1, "bytes_sent_per_node": sent_mib[run.label] * (run.seed + 1) * 2**20,
            "wall_time_s": 100.0, "train_s": 60.0, "inner_steps": 30, "command": "deca-flower reference --fast"}
    write_report(spec, planned, summaries, out_dir)
    return out_dir


def test_study_table_pairs_seeds_and_reports_bytes_and_step_time(tmp_path):
    out_dir = study(tmp_path, {"none": 400.0, "int4": 64.0})
    row = next(line for line in (out_dir / "README.md").read_text().splitlines() if line.startswith("| int4 |"))
    diffs = [a - b for a, b in zip(ACCURACY["int4"], ACCURACY["none"])]
    mean = sum(diffs) / 3
    half = stats.t.ppf(0.975, 2) * math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    assert f"{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}] (n=3)" in row
    assert row.rstrip().endswith("| 128 | 2.00 |")  # MiB sent per node (64 x 2 on average), 60 s / 30 steps
    assert (out_dir / "accuracy_vs_bytes.png").stat().st_size > 0
    assert (out_dir / "accuracy_vs_step.png").stat().st_size > 0


def test_no_bytes_plot_when_every_variant_sends_the_same_on_each_seed(tmp_path):
    out_dir = study(tmp_path, {"none": 400.0, "int4": 400.0}, int4_seeds=[0, 1])  # means over seeds differ
    assert not (out_dir / "accuracy_vs_bytes.png").exists()
    assert "vs bytes" not in (out_dir / "README.md").read_text()


def test_no_step_plot_when_every_run_was_evaluated_once(tmp_path):
    out_dir = study(tmp_path, {"none": 400.0, "int4": 64.0}, eval_steps=(6,))
    assert not (out_dir / "accuracy_vs_step.png").exists()
    readme = (out_dir / "README.md").read_text()
    assert "vs step" not in readme and "![accuracy vs bytes](accuracy_vs_bytes.png)" in readme
