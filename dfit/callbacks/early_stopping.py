"""``EarlyStopping``: stop when the monitored quantity stops improving (Keras 3's arguments and rules).

Every rank sees the same epoch logs, so every rank takes the same decision; fit also ORs ``stop_training``
over the ranks. The best weights are kept in memory on every rank (they are equal on every rank) and
restored on every rank at the end of training.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch

from .. import distributed as dist
from .monitor import MonitorCallback


class EarlyStopping(MonitorCallback):
    """Stop training after ``patience`` epochs without an improvement larger than ``min_delta``.

    ``baseline``: training also stops if no epoch beats it. ``restore_best_weights``: at the end of training
    (whether or not it stopped early) the weights of the best epoch are put back. ``start_from_epoch``:
    epochs before this index are not monitored.
    """

    def __init__(self, monitor: str = "val_loss", min_delta: float = 0, patience: int = 0, verbose: int = 0,
                 mode: str = "auto", baseline: float | None = None, restore_best_weights: bool = False,
                 start_from_epoch: int = 0) -> None:
        super().__init__(monitor, mode, min_delta=min_delta)
        self.patience, self.verbose, self.baseline = patience, verbose, baseline
        self.restore_best_weights, self.start_from_epoch = restore_best_weights, start_from_epoch
        self.wait = 0
        self.stopped_epoch = 0
        self.best_epoch = 0
        self.best_weights: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, logs=None):
        if self._starting():
            self.wait, self.stopped_epoch, self.best_epoch = 0, 0, 0
            self.best, self.best_weights = None, None

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor_op is None:
            self._set_monitor_op()
        current = self.get_monitor_value(logs)
        if current is None or epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights, self.best_epoch = self._weights(), epoch
        self.wait += 1
        if self._is_improvement(current, self.best):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self.best_weights = self._weights()
            if self.baseline is None or self._is_improvement(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.stopped_epoch > 0 and self.verbose > 0 and dist.is_chief():
            print(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose > 0 and dist.is_chief():
                print(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1}.")
            self.model.module.load_state_dict(self.best_weights)

    def get_monitor_value(self, logs: Mapping[str, Any] | None) -> float | None:
        logs = logs or {}
        value = logs.get(self.monitor)
        if value is None:
            warnings.warn(f"Early stopping conditioned on metric `{self.monitor}` which is not available. "
                          f"Available metrics are: {','.join(logs)}", stacklevel=2)
        return value

    def _weights(self) -> dict[str, torch.Tensor]:
        """A copy of the module's state (parameters and buffers), kept where the module is."""
        return {k: v.detach().clone() for k, v in self.model.module.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {"wait": self.wait, "stopped_epoch": self.stopped_epoch, "best": self.best,
                "best_epoch": self.best_epoch, "best_weights": self.best_weights}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._restored(state, "wait", "stopped_epoch", "best", "best_epoch", "best_weights")
