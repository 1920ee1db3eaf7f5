"""A small dfit training script for the launcher tests (runs unchanged under every launcher).

It trains, in float64 with plain SGD, the run that ``tests/reference_ddp.py`` (plain torch DDP, no dfit)
trains: same data, initial weights, global batch size, epochs, validation split and shuffle seed.
Rank 0 writes {"history", "weights" (each parameter flattened, in module order), "evaluate" ([loss, mae] on all
rows, unweighted), "predict", "world_size", "environment", "restart"} as JSON to --out.
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

import dfit
from reference_ddp import CONFIG, make_data, make_net


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
    p.add_argument("--epochs", type=int, default=CONFIG["epochs"])
    p.add_argument("--fail-rank", type=int)
    p.add_argument("--fail-once-marker")
    p.add_argument("--fail-stamp")
    p.add_argument("--tag")
    args = p.parse_args()
    torch.set_num_threads(1)
    x, y, w = make_data()
    c = CONFIG
    model = dfit.Model(make_net())
    model.compile(optimizer=dfit.optimizers.SGD(learning_rate=c["learning_rate"]), loss="mse", metrics=["mae"])
    callbacks = [FailAt(args.fail_rank, args.fail_once_marker, args.fail_stamp)] if args.fail_rank is not None else []
    epochs = args.epochs if args.fail_rank is None or args.fail_once_marker else 1000
    history = model.fit(x, y, sample_weight=w, batch_size=c["batch_size"], epochs=epochs,
                        validation_split=c["validation_split"], seed=c["seed"], verbose=0, callbacks=callbacks)
    evaluate = model.evaluate(x, y, batch_size=c["batch_size"], verbose=0)
    predict = model.predict(x, batch_size=c["batch_size"])
    if dfit.distributed.is_chief() and args.out:
        with open(args.out, "w") as fh:
            json.dump({"history": history.history, "world_size": dfit.distributed.world_size(),
                       "environment": dfit.distributed.environment(),
                       "weights": [p.detach().reshape(-1).tolist() for p in model.module.parameters()],
                       "evaluate": evaluate, "predict": np.asarray(predict)[:, 0].tolist(),
                       "restart": os.environ.get("TORCHELASTIC_RESTART_COUNT")}, fh)


if __name__ == "__main__":
    main()
