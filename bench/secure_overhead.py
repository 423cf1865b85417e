"""secure-gossip overhead: time to seal/open one block per neighbour and bytes added.

    python bench/secure_overhead.py [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from deca_flower.config import DecaConfig
from deca_flower.methods import method_blocks
from deca_flower.plan import meta_model
from deca_flower.secure import PairwiseChannel, write_demo_identities


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DecaConfig.model)
    args = parser.parse_args()
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# machine: {platform.machine()}, torch {torch.__version__}")
    keys = write_demo_identities(2, Path(tempfile.mkdtemp()))
    trusted = (keys / "trusted.json").read_text()
    import json

    a = PairwiseChannel(1, 0, (keys / "node_0.pem").read_bytes(), json.loads(trusted))
    b = PairwiseChannel(1, 1, (keys / "node_1.pem").read_bytes(), json.loads(trusted))
    start = time.perf_counter()
    a.add_neighbour(1, b.public.hex(), b.signature.hex())
    b.add_neighbour(0, a.public.hex(), a.signature.hex())
    handshake = (time.perf_counter() - start) / 2
    model = meta_model(args.model)
    blocks, _ = method_blocks(model, DecaConfig(model=args.model))
    shapes = {n: p.shape for n, p in model.named_parameters()}
    print("| block | plaintext MiB | seal s | open s | added bytes per neighbour | added fraction |")
    print("|---|---|---|---|---|---|")
    for first_step, block in ((0, blocks[0]), (3, blocks[-1])):  # a receiver opens each step once
        tensors = [torch.randn(shapes[n]) for n in block.param_names]
        plain = sum(t.numel() * 4 for t in tensors)
        seal, opened = [], []
        for step in range(first_step, first_step + 3):
            t0 = time.perf_counter()
            ct = a.seal(1, step, block.index, tensors)
            t1 = time.perf_counter()
            out = b.open(0, step, block.index, ct, tensors)
            seal.append(t1 - t0)
            opened.append(time.perf_counter() - t1)
        assert all(torch.equal(x, y) for x, y in zip(out, tensors))
        print(f"| {block.name} | {plain / 2**20:.1f} | {min(seal):.3f} | {min(opened):.3f} | {len(ct) - plain} "
              f"| {(len(ct) - plain) / plain:.2e} |")
    print(f"\nkey agreement + signature check per neighbour: {handshake * 1e3:.2f} ms (once per run); "
          "signed keys relayed per message: 2 x 64 hex + 2 x 128 hex characters per neighbour")


if __name__ == "__main__":
    main()
