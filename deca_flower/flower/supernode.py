"""`deca-flower-supernode`: Flower's `flower-supernode` (all its flags) with a warm node.

Flower's SuperNode naps a fixed 3 s whenever the SuperLink has no message for it, and runs every
message in a fresh `flwr-clientapp` process; DECA sends each node one message per inner step, so
the naps and a model loaded again per message would dominate a run. This command runs the very
same SuperNode with its polls capped at `--poll-interval-s` (default 0.25 s) and the node's
ClientApp warm in the SuperNode process (deca_flower/flower/internals/supernode.py). On a Flower
outside the tested versions it is plain `flower-supernode`. It stays a Flower SuperNode: any
Flower app runs on it.

    deca-flower-supernode --poll-interval-s 0.25 --insecure --superlink 127.0.0.1:9092 --node-config "..."
"""

from __future__ import annotations

import argparse
import sys

from deca_flower.flower import internals
from deca_flower.logs import use_flower_logging

DEFAULT_POLL_INTERVAL_S = 0.25


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="deca-flower-supernode", add_help=False,
                                     description="flower-supernode (all its flags, below) with a warm node")
    parser.add_argument("--poll-interval-s", type=float, default=DEFAULT_POLL_INTERVAL_S,
                        help=f"longest wait between polls of the SuperLink (default {DEFAULT_POLL_INTERVAL_S})")
    args, flower_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.poll_interval_s <= 0:
        parser.error(f"--poll-interval-s must be > 0, got {args.poll_interval_s}")
    if {"-h", "--help"} & set(flower_args):
        print(parser.format_help())  # then flower-supernode prints its own flags and exits
    use_flower_logging()  # the node's own log lines (a restore, a refused block) in the SuperNode's log
    internals.run_supernode(flower_args, args.poll_interval_s)


if __name__ == "__main__":
    main()
