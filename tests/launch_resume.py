"""A resumable training job for the real-process resume tests (runs under dfit-launch, torchrun or python).

The job of ``resume_job.train`` (float64, plain SGD, shuffled arrays) with ``BackupAndRestore(--backup,
save_freq=--save-freq)``. Rank 0 writes {"weights", "history", "world_size", "restart"} as JSON to --out.
--kill-rank R --kill-at E:B: rank R SIGKILLs itself after batch B of epoch E, once (--kill-marker PATH).
--ready PATH: rank 0 creates PATH after global step --ready-step (a test then signals the job).
--step-sleep S: every rank sleeps S seconds after each step (so a signal lands mid-epoch).
--started PATH: rank 0 of every start of the job appends "EPOCH:BATCH WORLD_SIZE" of its first step to PATH.
"""
import argparse
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dfit  # noqa: E402
from resume_job import build, data  # noqa: E402


class Chaos(dfit.callbacks.Callback):
    def __init__(self, args):
        super().__init__()
        self.args, self.epoch, self.step = args, 0, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        a, rank = self.args, dfit.distributed.rank()
        self.step += 1
        if a.started and rank == 0 and self.step == 1:
            with open(a.started, "a") as fh:
                fh.write(f"{self.epoch}:{batch} {dfit.distributed.world_size()}\n")
        if a.kill_at and rank == a.kill_rank and (self.epoch, batch) == tuple(map(int, a.kill_at.split(":"))) \
                and not os.path.exists(a.kill_marker):
            open(a.kill_marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        if a.ready and rank == 0 and self.step == a.ready_step:
            open(a.ready, "w").close()
        if a.step_sleep:
            time.sleep(a.step_sleep)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--backup", required=True)
    p.add_argument("--save-freq", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rows", type=int, default=60)
    p.add_argument("--signal-check-every", type=int, default=4)
    p.add_argument("--kill-rank", type=int, default=1)
    p.add_argument("--kill-at")
    p.add_argument("--kill-marker")
    p.add_argument("--ready")
    p.add_argument("--ready-step", type=int, default=5)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--started")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    x, y = data(args.rows)
    model = build()
    backup = dfit.callbacks.BackupAndRestore(args.backup, save_freq=args.save_freq,
                                             signal_check_every=args.signal_check_every)
    schedule = dfit.callbacks.TorchScheduler(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 4, 0.8),
                                             interval="step")
    history = model.fit(x, y, batch_size=10, epochs=args.epochs, seed=3, verbose=0, validation_split=0.2,
                        callbacks=[schedule, Chaos(args), backup])
    if dfit.distributed.is_chief():
        with open(args.out, "w") as fh:
            json.dump({"weights": [p.detach().numpy().tolist() for p in model.module.parameters()],
                       "history": history.history, "world_size": dfit.distributed.world_size(),
                       "restart": os.environ.get("TORCHELASTIC_RESTART_COUNT")}, fh)


if __name__ == "__main__":
    main()
