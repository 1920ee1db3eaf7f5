"""Learning-rate callbacks: Keras' ``ReduceLROnPlateau`` and ``LearningRateScheduler``, and
``TorchScheduler``, which runs a ``torch.optim.lr_scheduler`` per epoch or per step.

They act on the torch optimizer's ``param_groups`` (every group: each group's ``"lr"`` is read and written),
which is also what an optimizer exposing a ``learning_rate`` property reads. Every rank sees the same epoch
logs and runs the same rule, so every rank has the same learning rate at every step. Like Keras, they put
the learning rate (of the first parameter group) into the epoch logs as ``learning_rate``.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .. import distributed as dist
from .base import Callback
from .monitor import MonitorCallback


def _optimizer(model: Any) -> torch.optim.Optimizer:
    opt = getattr(model, "optimizer", None)
    if opt is None or not hasattr(opt, "param_groups"):
        raise ValueError("this callback needs a compiled model whose optimizer has param_groups (a torch "
                         f"optimizer); got {type(opt).__name__}")
    return opt


def get_learning_rate(optimizer: Any) -> float:
    """The learning rate of the optimizer's first parameter group, as a float."""
    return float(optimizer.param_groups[0]["lr"])


def _set_group_lr(group: dict[str, Any], value: float) -> None:
    if isinstance(group["lr"], torch.Tensor):  # torch allows a tensor lr (e.g. for capturable optimizers)
        group["lr"].fill_(value)
    else:
        group["lr"] = float(value)


def _log_learning_rate(model: Any, logs: Mapping[str, Any] | None) -> None:
    if isinstance(logs, dict):
        logs["learning_rate"] = get_learning_rate(_optimizer(model))


class ReduceLROnPlateau(MonitorCallback):
    """Multiply the learning rate by ``factor`` after ``patience`` epochs without an improvement larger than
    ``min_delta``; then wait ``cooldown`` epochs; never below ``min_lr`` (Keras 3's arguments and rules)."""

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10, verbose: int = 0,
                 mode: str = "auto", min_delta: float = 1e-4, cooldown: int = 0, min_lr: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(monitor, mode, min_delta=min_delta)
        if kwargs:
            raise TypeError(f"ReduceLROnPlateau got unexpected arguments {sorted(kwargs)}")
        if factor >= 1.0:
            raise ValueError(f"ReduceLROnPlateau does not support a factor >= 1.0. Received factor={factor}")
        self.factor, self.min_lr, self.patience = factor, min_lr, patience
        self.verbose, self.cooldown = verbose, cooldown
        self.cooldown_counter = 0
        self.wait = 0

    def on_train_begin(self, logs=None):
        if self._starting():
            self.best, self.cooldown_counter, self.wait = None, 0, 0

    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor_op is None:
            self._set_monitor_op()
        _log_learning_rate(self.model, logs)
        logs = logs or {}
        current = logs.get(self.monitor)
        if current is None:
            warnings.warn(f"Learning rate reduction is conditioned on metric `{self.monitor}` which is not "
                          f"available. Available metrics are: {','.join(logs)}.", stacklevel=2)
            return
        if self.in_cooldown():
            self.cooldown_counter -= 1
            self.wait = 0
        if self._is_improvement(current, self.best):
            self.best, self.wait = current, 0
        elif not self.in_cooldown():
            self.wait += 1
            if self.wait >= self.patience and self._reduce(epoch):
                self.cooldown_counter, self.wait = self.cooldown, 0

    def _reduce(self, epoch: int) -> bool:
        reduced = False
        for group in _optimizer(self.model).param_groups:
            old = float(group["lr"])
            if old > np.float32(self.min_lr):
                new = max(old * self.factor, self.min_lr)
                _set_group_lr(group, new)
                reduced = True
                if self.verbose > 0 and dist.is_chief():
                    print(f"\nEpoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to {new}.")
        return reduced

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._restored(state, "best", "wait", "cooldown_counter")


class LearningRateScheduler(Callback):
    """At the start of each epoch set the learning rate to ``schedule(epoch, lr)`` (or ``schedule(epoch)``),
    epoch 0-based as in Keras. The schedule is called once per parameter group with that group's rate."""

    def __init__(self, schedule: Callable[..., float], verbose: int = 0) -> None:
        super().__init__()
        if not callable(schedule):
            raise TypeError(f"schedule must be a function (epoch, lr) -> lr; got {type(schedule).__name__}")
        self.schedule, self.verbose = schedule, verbose

    def _new_rate(self, epoch: int, lr: float) -> float:
        try:
            value = self.schedule(epoch, lr)
        except TypeError:  # Keras' older one-argument schedules
            value = self.schedule(epoch)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (float, np.floating, numbers.Real)):
            raise ValueError(f"The output of the `schedule` function should be a float. Got: {value}")
        return float(value)

    def on_epoch_begin(self, epoch, logs=None):
        for group in _optimizer(self.model).param_groups:
            value = self._new_rate(epoch, float(group["lr"]))
            _set_group_lr(group, value)
            if self.verbose > 0 and dist.is_chief():
                print(f"\nEpoch {epoch + 1}: LearningRateScheduler setting learning rate to {value}.")

    def on_epoch_end(self, epoch, logs=None):
        _log_learning_rate(self.model, logs)


class TorchScheduler(Callback):
    """Run a ``torch.optim.lr_scheduler`` during fit.

    ``scheduler``: a scheduler built on ``model.optimizer``, or a factory ``optimizer -> scheduler`` (built at
    the start of training, e.g. ``lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10)``), which is the only
    way when the optimizer is made by ``compile``. ``interval="epoch"``: ``scheduler.step()`` after every
    epoch; ``"step"``: after every training step (no logs are read: no synchronisation). A
    ``torch.optim.lr_scheduler.ReduceLROnPlateau`` steps per epoch with ``logs[monitor]`` (default
    ``"val_loss"``).
    """

    reads_logs_at_once = True

    def __init__(self, scheduler: Any, interval: str = "epoch", monitor: str | None = None) -> None:
        super().__init__()
        if interval not in ("epoch", "step"):
            raise ValueError(f"interval must be 'epoch' or 'step'; got {interval!r}")
        is_scheduler = hasattr(scheduler, "step") and hasattr(scheduler, "optimizer")
        if not is_scheduler and not callable(scheduler):
            raise TypeError("scheduler must be a torch.optim.lr_scheduler object or a function optimizer -> "
                            f"scheduler; got {type(scheduler).__name__}")
        self.scheduler = scheduler if is_scheduler else None
        self._factory = None if is_scheduler else scheduler
        self.interval = interval
        self._monitor = monitor
        self._pending_state: Mapping[str, Any] | None = None
        if is_scheduler:
            self._check_interval()
        if interval == "step":
            self.on_train_batch_end = self._on_train_batch_end

    @property
    def monitor(self) -> str | None:
        """The logged quantity given to a plateau scheduler (None for the others)."""
        return (self._monitor or "val_loss") if self._on_plateau() else None

    def _on_plateau(self) -> bool:
        return isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)

    def _check_interval(self) -> None:
        if self._on_plateau() and self.interval == "step":
            raise ValueError("a ReduceLROnPlateau scheduler needs epoch logs: use interval='epoch'")
        if not self._on_plateau() and self._monitor is not None:
            raise ValueError(f"monitor= is for a ReduceLROnPlateau scheduler; {type(self.scheduler).__name__} "
                             "steps without a metric")

    def on_train_begin(self, logs=None):
        optimizer = _optimizer(self.model)
        if self._factory is not None and (self.scheduler is None or self.scheduler.optimizer is not optimizer):
            self.scheduler = self._factory(optimizer)
            if not hasattr(self.scheduler, "step"):
                raise TypeError(f"the scheduler factory returned {type(self.scheduler).__name__}, not a scheduler")
            self._check_interval()
        if self.scheduler.optimizer is not optimizer:
            raise ValueError("the scheduler was built on another optimizer than model.optimizer: build it after "
                             "compile() on model.optimizer, or pass a factory optimizer -> scheduler")
        if self._pending_state is not None:
            self.scheduler.load_state_dict(self._pending_state)
            self._pending_state = None

    def _on_train_batch_end(self, batch, logs=None):
        self.scheduler.step()

    def on_epoch_end(self, epoch, logs=None):
        if self.interval == "epoch":
            if self._on_plateau():
                value = (logs or {}).get(self.monitor)
                if value is None:
                    warnings.warn(f"TorchScheduler: `{self.monitor}` is not in the logs; the scheduler did not "
                                  f"step. Available: {','.join(logs or {})}", stacklevel=2)
                else:
                    self.scheduler.step(value)
            else:
                self.scheduler.step()
        _log_learning_rate(self.model, logs)

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()} if self.scheduler is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "scheduler" not in state:
            return
        if self.scheduler is not None and self._factory is None:
            self.scheduler.load_state_dict(state["scheduler"])
        else:
            self._pending_state = state["scheduler"]
