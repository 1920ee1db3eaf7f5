"""A small dfit training script for the launcher tests (runs unchanged under every launcher).

Rank 0 writes {"history", "weights_sum", "world_size", "environment", "restart"} as JSON to --out.
--fail-rank R: rank R raises ValueError at step 3 (batch index 2) of epoch 1 (the first epoch).
--fail-once-marker PATH: only fail while PATH does not exist (it is created on failing): tests restarts.
--fail-stamp PATH: the failing rank writes time.time() there just before raising.
--tag: ignored; lets a test find its own processes.
"""
import argparse
import json
import os
import time

import numpy as np
import torch
from torch import nn

import dfit


class FailAt(dfit.callbacks.Callback):
    def __init__(self, rank, marker, stamp):
        super().__init__()
        self.rank, self.marker, self.stamp, self.epoch = rank, marker, stamp, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self.epoch == 0 and batch == 2 and dfit.distributed.rank() == self.rank:
            if self.marker:
                if os.path.exists(self.marker):
                    return
                open(self.marker, "w").close()
            if self.stamp:
                with open(self.stamp, "w") as fh:
                    fh.write(repr(time.time()))
            raise ValueError(f"injected failure on rank {self.rank} at step 3 of epoch 1")

    def on_train_batch_end(self, batch, logs=None):
        if self.rank is not None and self.marker is None:
            time.sleep(0.02)  # the healthy ranks would otherwise finish before the failure lands


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--fail-rank", type=int)
    p.add_argument("--fail-once-marker")
    p.add_argument("--fail-stamp")
    p.add_argument("--tag")
    args = p.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(300, 1))).astype(np.float32)
    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)])
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    callbacks = [FailAt(args.fail_rank, args.fail_once_marker, args.fail_stamp)] if args.fail_rank is not None else []
    epochs = args.epochs if args.fail_rank is None or args.fail_once_marker else 1000
    history = model.fit(x, y, batch_size=30, epochs=epochs, validation_split=0.2, seed=0, verbose=0,
                        callbacks=callbacks)
    if dfit.distributed.is_chief() and args.out:
        with open(args.out, "w") as fh:
            json.dump({"history": history.history, "world_size": dfit.distributed.world_size(),
                       "environment": dfit.distributed.environment(),
                       "weights_sum": float(sum(p.detach().double().sum() for p in model.module.parameters())),
                       "restart": os.environ.get("TORCHELASTIC_RESTART_COUNT")}, fh)


if __name__ == "__main__":
    main()
