"""bench/bma_signal.py on the tiny model: the figures say what the conventions are built to do."""

import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "bma_signal.py"


@pytest.fixture(scope="module")
def bench():
    return runpy.run_path(str(SCRIPT))


def rows(bench, tiny_cfg, variant):
    cfg = tiny_cfg.replace(num_nodes=4, topology="erdos_renyi", steps_per_block=3)
    return bench["visit"](bench["variant_config"](cfg, variant), 1)


def test_scaled_signal_overrides_the_gradient(bench, tiny_cfg):
    scaled = rows(bench, tiny_cfg, "scaled")
    assert all(r["h/g"] > 10 for r in scaled)  # h in units of Adam's normalised update, g in gradient units
    assert scaled[0]["g/m'"] == pytest.approx(1.0)  # fresh moments: m' = (1 - a1) g
    assert all(r["g/m'"] < 0.05 for r in scaled[1:])  # after one fold the gradient hardly moves m


def test_without_bma_or_consensus_part_the_first_moment_is_adams(bench, tiny_cfg):
    for variant in ("none", "gradient:0"):
        assert all(r["dm/m"] == 0.0 for r in rows(bench, tiny_cfg, variant)), variant
    assert all(r["dv/v"] == 0.0 for r in rows(bench, tiny_cfg, "none"))


def test_gradient_units_keep_the_gradient_in_charge(bench, tiny_cfg):
    gentle = rows(bench, tiny_cfg, "gradient:1")
    assert all(r["h/g"] < 2 for r in gentle)
    assert all(r["g/m'"] > 0.1 for r in gentle)
