"""The built-in callbacks on 2 ranks: every decision on both ranks at the same step, every file once.

One spawned job runs several fits (each checks a few callbacks) and returns what each rank saw; the tests
below assert on those results and on the files rank 0 wrote.
"""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from ranks import run_ranks

pytestmark = pytest.mark.timeout(300)

EPOCHS = 8
PROBE = [1.0, 0.7, 0.6, 0.65, 0.62, 0.61, 0.5, 0.4]  # best at epoch 2; patience 3 stops at epoch 5
NAN_ROW = 11  # global batch 2 (batch_size 4, no shuffle) holds rows 8-11: rank 0 gets 8-9, rank 1 gets 10-11


def data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    return x, x @ np.array([[1.5], [-2.0]]) + 0.3 + 0.1 * rng.normal(size=(n, 1))


def model_on(lr=0.05):
    import torch
    from torch import nn

    import dfit

    torch.manual_seed(0)
    model = dfit.Model(nn.Linear(2, 1, dtype=torch.float64))
    model.compile(optimizer=lambda p: torch.optim.SGD(p, lr=lr), loss="mse", metrics=["mae"])
    return model


def on_ranks(folder: str):
    """Runs on every rank; returns what each rank saw."""
    import torch

    import dfit
    from dfit import callbacks as C
    from dfit import distributed as dist

    rank = dist.rank()
    out: dict = {}

    class LogsAgree(C.Callback):
        """Fails unless every rank got the very same epoch logs (the property every decision relies on)."""

        def on_epoch_end(self, epoch, logs=None):
            every = dist.all_gather_objects(dict(logs))
            assert all(o == every[0] for o in every), f"epoch {epoch}: ranks saw different logs {every}"

    class Probe(C.Callback):
        """Puts a scripted value into the logs (the same on every rank) and records the weights per epoch."""

        def __init__(self):
            super().__init__()
            self.weights = []

        def on_epoch_end(self, epoch, logs=None):
            logs["val_probe"] = PROBE[epoch]
            self.weights.append(self.model.get_weights()[0].copy())

    # 1. EarlyStopping + restore, ReduceLROnPlateau, ModelCheckpoint (best only), CSVLogger, TensorBoard
    x, y = data()
    model = model_on()
    probe = Probe()
    stopping = C.EarlyStopping(monitor="val_probe", mode="min", patience=3, restore_best_weights=True)
    plateau = C.ReduceLROnPlateau(monitor="val_probe", mode="min", patience=1, factor=0.5, min_delta=0.0)
    history = model.fit(x, y, batch_size=4, epochs=EPOCHS, verbose=0, validation_split=0.25, shuffle=True,
                        seed=3, callbacks=[
                            LogsAgree(), probe, stopping, plateau,
                            C.ModelCheckpoint(os.path.join(folder, "ck", "w.{epoch:02d}-{val_probe:.2f}.pt"),
                                              monitor="val_probe", mode="min", save_best_only=True, save_weights_only=True),
                            C.CSVLogger(os.path.join(folder, "log.csv")),
                            C.TensorBoard(os.path.join(folder, "tb"), update_freq=2)])
    out["history"] = history.history
    out["epochs"] = history.epoch
    out["stopped_epoch"] = stopping.stopped_epoch
    out["final_weights"] = model.get_weights()[0].copy()
    out["best_weights"] = probe.weights[stopping.best_epoch]
    out["lr"] = model.optimizer.param_groups[0]["lr"]

    # 2. LearningRateScheduler and a torch scheduler per step
    model = model_on(lr=0.1)
    model.fit(x, y, batch_size=4, epochs=3, verbose=0, callbacks=[
        C.LearningRateScheduler(lambda epoch, lr: 0.1 * 0.5 ** epoch),
        C.ModelCheckpoint(os.path.join(folder, "steps", "s.{epoch}-{batch}-{loss:.0f}.pt"), save_freq=4)])
    out["scheduled_lr"] = model.optimizer.param_groups[0]["lr"]
    model = model_on(lr=0.1)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[
        C.TorchScheduler(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5), "step")])
    out["torch_step_lr"] = model.optimizer.param_groups[0]["lr"]  # 12 steps: halved 3 times

    # 3. only rank 1 decides to stop (rank-local state): every rank stops after the same epoch
    class RankOneStops(C.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if rank == 1 and epoch == 2:
                self.model.stop_training = True

    model = model_on()
    out["rank_local_stop_epochs"] = model.fit(x, y, batch_size=4, epochs=6, verbose=0,
                                              callbacks=[RankOneStops()]).epoch

    # 4. TerminateOnNaN: the NaN is in rank 1's part of global batch 2; both ranks end after that step
    x_nan = x.copy()
    x_nan[NAN_ROW] = 1e200   # its squared error overflows to inf (NaN in the data is refused before training)
    steps: list[int] = []
    model = model_on()
    nan_history = model.fit(x_nan, y, batch_size=4, epochs=3, verbose=0, shuffle=False, callbacks=[
        C.LambdaCallback(on_train_batch_end=lambda b, logs: steps.append(b)), C.TerminateOnNaN()])
    out["nan_steps"], out["nan_epochs"] = steps, nan_history.epoch
    try:
        model_on().fit(x_nan, y, batch_size=4, epochs=3, verbose=0, shuffle=False,
                       callbacks=[C.TerminateOnNaN(raise_error=True)])
        out["nan_raised"] = None
    except RuntimeError as e:
        out["nan_raised"] = str(e)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("cb2"))
    return folder, run_ranks(on_ranks, 2, folder, timeout=240)


def test_every_rank_stops_at_the_same_epoch_and_restores_the_same_best_weights(two_ranks):
    _, (r0, r1) = two_ranks
    assert r0["epochs"] == r1["epochs"] == [0, 1, 2, 3, 4, 5]
    assert r0["stopped_epoch"] == r1["stopped_epoch"] == 5
    np.testing.assert_array_equal(r0["final_weights"], r1["final_weights"])
    np.testing.assert_array_equal(r0["final_weights"], r0["best_weights"])  # the weights after epoch 2
    assert r0["history"] == r1["history"]


def test_learning_rate_is_the_same_on_every_rank(two_ranks):
    _, (r0, r1) = two_ranks
    # plateau (patience 1, factor 0.5) on PROBE: no improvement at epochs 3, 4, 5; the logs hold the rate the
    # epoch ran with (logged before the reduction, as Keras)
    assert r0["history"]["learning_rate"] == r1["history"]["learning_rate"] == [0.05, 0.05, 0.05, 0.05, 0.025,
                                                                                0.0125]
    assert r0["lr"] == r1["lr"] == 0.00625
    assert r0["scheduled_lr"] == r1["scheduled_lr"] == 0.025
    assert r0["torch_step_lr"] == r1["torch_step_lr"] == pytest.approx(0.0125)


def test_a_stop_decided_on_one_rank_stops_every_rank(two_ranks):
    _, (r0, r1) = two_ranks
    assert r0["rank_local_stop_epochs"] == r1["rank_local_stop_epochs"] == [0, 1, 2]


def test_terminate_on_nan_ends_every_rank_at_the_same_step(two_ranks):
    _, (r0, r1) = two_ranks
    assert r0["nan_steps"] == r1["nan_steps"] == [0, 1, 2]
    assert r0["nan_epochs"] == r1["nan_epochs"] == [0]
    for r in (r0, r1):  # raised on both ranks (rank 0's own loss was still finite at that step)
        assert "NaN or Inf loss encountered at batch 2" in r["nan_raised"]
    assert "another rank" in r0["nan_raised"] and "Loss value: inf" in r1["nan_raised"]


def test_files_are_written_once_by_rank_zero(two_ranks):
    folder, (r0, _) = two_ranks
    # best-only on PROBE: epochs 1, 2, 3 improve (1.0, 0.7, 0.6), later ones do not before the stop
    assert sorted(os.listdir(os.path.join(folder, "ck"))) == ["w.01-1.00.pt", "w.02-0.70.pt", "w.03-0.60.pt"]
    with open(os.path.join(folder, "log.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["epoch", "learning_rate", "loss", "mae", "val_loss", "val_mae", "val_probe"]
    assert [int(r["epoch"]) for r in rows] == r0["epochs"]
    assert [float(r["val_loss"]) for r in rows] == r0["history"]["val_loss"]
    assert sorted(os.listdir(folder)) == ["ck", "log.csv", "steps", "tb"]  # no temporary files
    # save_freq=4 over 3 epochs of 6 steps: steps 4, 8, 12, 16 = (epoch 1, batch 4), (2, 2), (2, 6), (3, 4)
    saved = sorted(os.listdir(os.path.join(folder, "steps")))
    assert [name.split("-")[:2] for name in saved] == [["s.1", "4"], ["s.2", "2"], ["s.2", "6"], ["s.3", "4"]]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for sub, tags in (("train", {"epoch_loss", "epoch_mae", "epoch_learning_rate", "batch_loss"}),
                      ("validation", {"epoch_loss", "epoch_mae", "epoch_probe", "evaluation_loss_vs_iterations"})):
        path = os.path.join(folder, "tb", sub)
        assert len(os.listdir(path)) == 1, "one event file: only rank 0 writes"
        acc = EventAccumulator(path)
        acc.Reload()
        assert tags <= set(acc.Tags()["scalars"])
        if sub == "train":
            assert [e.value for e in acc.Scalars("epoch_loss")] == pytest.approx(r0["history"]["loss"])
            # TensorBoard reads the optimizer at its turn, after the reduction (as Keras' does)
            assert [e.value for e in acc.Scalars("epoch_learning_rate")] == pytest.approx(
                [0.05, 0.05, 0.05, 0.025, 0.0125, 0.00625])
            assert [e.step for e in acc.Scalars("batch_loss")] == list(range(2, 6 * 5 + 1, 2))  # 5 steps/epoch
        else:
            assert [e.value for e in acc.Scalars("epoch_loss")] == pytest.approx(r0["history"]["val_loss"])
