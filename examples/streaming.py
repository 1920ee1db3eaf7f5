"""Training from streams: an endless generator with ``steps_per_epoch``, and ``per_rank`` shards.

    python examples/streaming.py
    dfit-launch --nproc-per-node 2 examples/streaming.py        # the same history as one process

Default mode: the generator yields GLOBAL batches (the same on every rank, so it is seeded); every rank keeps its
part of each batch. ``--per-rank``: each rank generates its own batches (here: every rank its own seed), and a
step's loss is normalised by the rows of that step over all ranks.
"""
from __future__ import annotations

import argparse
import os
from typing import Iterator

import numpy as np
import torch
from torch import nn

import dfit

TRUE_W = np.array([[1.5], [-2.0], [0.5], [3.0]])


def global_batches(batch_size: int, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """An endless, seeded stream of (x, y) batches of a noisy linear function."""
    rng = np.random.default_rng(seed)
    while True:
        x = rng.normal(size=(batch_size, 4)).astype(np.float32)
        y = (x @ TRUE_W + 0.1 * rng.normal(size=(batch_size, 1))).astype(np.float32)
        yield x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps-per-epoch", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32, help="rows per item of the stream")
    parser.add_argument("--per-rank", action="store_true", help="each rank generates its own batches")
    args = parser.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)])
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    if args.per_rank:
        source = dfit.data.per_rank(lambda rank, world: global_batches(args.batch_size, seed=1000 + rank))
    else:
        source = global_batches(args.batch_size)
    validation = dfit.data.per_rank(lambda rank, world: global_batches(args.batch_size, seed=77 + rank)) \
        if args.per_rank else global_batches(args.batch_size, seed=77)
    history = model.fit(source, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                        validation_data=validation, validation_steps=5, verbose=2)
    if dfit.distributed.is_chief():
        print(f"streaming: {dfit.distributed.world_size()} process(es), final loss "
              f"{history.history['loss'][-1]:.4f}, val_loss {history.history['val_loss'][-1]:.4f}")


if __name__ == "__main__":
    main()
