"""Route deca_flower's log lines through Flower's console handler (same format, same stream)."""

from __future__ import annotations

import logging


def use_flower_logging() -> None:
    ours = logging.getLogger("deca_flower")
    if ours.handlers:
        return
    ours.setLevel(logging.INFO)
    ours.propagate = False
    for handler in logging.getLogger("flwr").handlers:
        ours.addHandler(handler)
