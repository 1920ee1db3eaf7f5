"""A small dfit training job for tests/test_faults.py, under any launcher.

--epochs N: epochs to train (tiny MLP, 64 rows; each step sleeps --step-sleep seconds so a job lasts).
--ready-dir D: each rank creates D/rank<R> once its first epoch has ended (a test waits for training to run).
--stall-rank R --stall-seconds S: rank R sleeps S seconds inside step 3 of the second epoch (--stall-stamp P:
writing time.time() to P first).
--tag: ignored; lets a test find its own processes.
"""
import argparse
import os
import time

import numpy as np
import torch
from torch import nn

import dfit


class Faults(dfit.callbacks.Callback):
    def __init__(self, args):
        super().__init__()
        self.args, self.epoch = args, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if self.args.ready_dir and epoch == 0:
            open(os.path.join(self.args.ready_dir, f"rank{dfit.distributed.rank()}"), "w").close()

    def on_train_batch_begin(self, batch, logs=None):
        if self.epoch == 1 and batch == 2 and dfit.distributed.rank() == self.args.stall_rank:
            if self.args.stall_stamp:
                with open(self.args.stall_stamp, "w") as fh:
                    fh.write(repr(time.time()))
            time.sleep(self.args.stall_seconds)

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(self.args.step_sleep)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--ready-dir")
    p.add_argument("--stall-rank", type=int)
    p.add_argument("--stall-seconds", type=float, default=0.0)
    p.add_argument("--stall-stamp", help="the stalled rank writes time.time() there as it starts to sleep")
    p.add_argument("--tag")
    args = p.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)), rng.normal(size=(64, 1))
    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(4, 8, dtype=torch.float64), nn.Tanh(), nn.Linear(8, 1, dtype=torch.float64)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, batch_size=8, epochs=args.epochs, verbose=0, seed=0, callbacks=[Faults(args)])


if __name__ == "__main__":
    main()
