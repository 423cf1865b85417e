"""The DECA algorithm in plain PyTorch (no Flower import): blocks, block-wise Adam with BMA,
topologies and mixing weights, gossip, schedule, one node, and the single-process reference."""
