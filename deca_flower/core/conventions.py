"""Names of the BMA variants and consensus-signal conventions (core/optimizer.py defines them).

Kept free of torch so that the run configuration, which the ServerApp also loads, can check them."""

BMA_MODES = ("full", "none", "trivial")
DISCREPANCIES = ("scaled", "raw", "normalized", "gradient")
DIVIDES_BY_LR = ("scaled", "gradient")  # h divides by lr: lr = 0 only without BMA
