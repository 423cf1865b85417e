"""`deca-flower` command line: prepare the embedded default, or run the single-process reference.

    deca-flower prepare                         # convert + cache SmolLM2-135M-Instruct (once)
    deca-flower reference --run-config "model='tiny-random' num-nodes=3"
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from deca_flower.config import ConfigError, DecaConfig


def parse_overrides(text: str) -> dict:
    """Flower-style "k=v k2='s'" overrides (parsed by Flower's own parser)."""
    from flwr.common.config import parse_config_args

    return parse_config_args([text]) if text else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deca-flower", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="download and convert the embedded default model (SmolLM2-135M-Instruct)")
    ref = sub.add_parser("reference", help="run DECA for all nodes in one process (no Flower)")
    ref.add_argument("--run-config", default="", help="overrides, e.g. \"num-nodes=3 bma='none'\"")
    ref.add_argument("--fast", action="store_true", help="mix all nodes with one matmul per tensor")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "prepare":
        from deca_flower.models import prepare_default_model

        print(prepare_default_model())
        return 0
    try:
        cfg = DecaConfig.from_run_config(parse_overrides(args.run_config))
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    from deca_flower.reference_run import run_reference_job

    print(json.dumps(run_reference_job(cfg, fast=args.fast), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
