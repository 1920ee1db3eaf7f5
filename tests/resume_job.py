"""The training job of the resume tests (importable by spawned ranks and by ``tests/launch_resume.py``).

float64, plain SGD with a per-step learning-rate schedule (callback state), shuffled arrays, a validation split;
``stop_at=(epoch, batch)`` raises ``Stop`` on every rank after that batch (an in-process kill).
"""
from __future__ import annotations

import numpy as np

EPOCHS, BATCH, ROWS = 3, 10, 60


class Stop(Exception):
    """The simulated kill."""


def data(rows: int = ROWS):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 4))
    return x, np.tanh(x @ rng.normal(size=(4, 2))) + 0.1 * rng.normal(size=(rows, 2))


def build(dropout: float = 0.0):
    import torch
    from torch import nn

    import dfit

    torch.manual_seed(0)
    layers = [nn.Linear(4, 8, dtype=torch.float64), nn.Tanh()]
    layers += [nn.Dropout(dropout)] if dropout else []
    model = dfit.Sequential(layers + [nn.Linear(8, 2, dtype=torch.float64)])
    model.compile(optimizer=lambda p: torch.optim.SGD(p, lr=0.1), loss="mse", metrics=["mae"])
    return model


def train(backup_dir: str | None, save_freq=2, stop_at=None, dropout: float = 0.0, epochs: int = EPOCHS,
          model=None, x=None, y=None, **fit_kwargs):
    """Fit with BackupAndRestore (when ``backup_dir``); returns (weights, history) or "stopped"."""
    import torch

    import dfit

    class StopAt(dfit.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if (self.epoch, batch) == stop_at:
                raise Stop(f"stopped at epoch {self.epoch} batch {batch}")

    model = model or build(dropout)
    if x is None:
        x, y = data()
    schedule = dfit.callbacks.TorchScheduler(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 4, 0.8),
                                             interval="step")
    callbacks = [schedule]
    if backup_dir is not None:
        callbacks.append(dfit.callbacks.BackupAndRestore(backup_dir, save_freq=save_freq))
    if stop_at is not None:
        callbacks.append(StopAt())
    try:
        kwargs = dict(batch_size=BATCH, epochs=epochs, seed=3, verbose=0, validation_split=0.2)
        kwargs.update(fit_kwargs)
        history = model.fit(x, y, callbacks=callbacks, **kwargs)
    except Stop:
        return "stopped"
    return [p.detach().numpy().copy() for p in model.module.parameters()], history.history


def relative_difference(a, b) -> float:
    """The largest |a - b| / max(|a|, |b|, 1e-300) over weights (lists of arrays) and history (dicts of lists)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        return max(relative_difference(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and a and not isinstance(a[0], (float, int)):
        assert len(a) == len(b)
        return max(relative_difference(u, v) for u, v in zip(a, b))
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-300)).max())
