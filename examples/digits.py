"""The dfit demo: a small network on scikit-learn's bundled digits (no download), trained with fit().

Runs unchanged as ``python examples/digits.py``, ``torchrun --nproc-per-node 2 examples/digits.py``,
``dfit-launch --nproc-per-node 2 examples/digits.py``, under srun, or under ``mpiexec -n 2``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import dfit


def build_model(seed: int) -> dfit.Model:
    torch.manual_seed(seed)
    return dfit.Sequential([nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", default="auto")
    parser.add_argument("--history-out", help="rank 0 writes the history here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(1234).permutation(len(x))  # the file is grouped by writer: mix it once
    x, y = x[order], y[order]

    model = build_model(args.seed)
    model.compile(optimizer=torch.optim.Adam(model.module.parameters(), lr=3e-3),
                  loss=dfit.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    verbose = args.verbose if args.verbose == "auto" else int(args.verbose)
    start = time.perf_counter()
    history = model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, validation_split=0.2,
                        seed=args.seed, verbose=verbose)
    elapsed = time.perf_counter() - start

    if dfit.distributed.is_chief():
        val_acc = history.history["val_accuracy"][-1]
        print(f"digits: {dfit.distributed.world_size()} process(es) [{dfit.distributed.environment()}], "
              f"val_accuracy={val_acc:.4f}, fit time {elapsed:.1f} s")
        if args.history_out:
            with open(args.history_out, "w") as fh:
                json.dump({"history": history.history, "epoch": history.epoch,
                           "world_size": dfit.distributed.world_size(),
                           "environment": dfit.distributed.environment()}, fh)


if __name__ == "__main__":
    main()
