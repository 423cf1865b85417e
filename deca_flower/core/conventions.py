"""Names of the BMA variants and consensus-signal conventions (core/optimizer.py defines them) and
of the gossip compression codecs (core/compression.py).

Kept free of torch so that the run configuration, which the ServerApp also loads, can check them."""

BMA_MODES = ("full", "none", "trivial")
DISCREPANCIES = ("scaled", "raw", "normalized", "gradient")
DIVIDES_BY_LR = ("scaled", "gradient")  # h divides by lr: lr = 0 only without BMA
COMPRESSIONS = ("none", "int8", "int4", "topk")  # order fixes the codec id in a compressed header
