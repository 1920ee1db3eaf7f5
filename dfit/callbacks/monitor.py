"""``MonitorCallback``: the base of callbacks that watch one logged quantity (mode, min_delta, "improved?").

Keras 3 decides ``mode="auto"`` from the metric: ``loss`` (also ``val_loss``) is minimised, metrics that
grow when better (accuracy, AUC, precision, recall, F-scores, R², IoU, correlations, cosine similarity) are
maximised, error-like metrics minimised, and any other name is an error asking for ``mode``. dfit's metrics
are named like Keras', so the decision is made from the name (prefixes such as ``val_`` and ``output_1_``
and torchmetrics' ``multiclass_`` are recognised by the name's ending).
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

import numpy as np

from .base import Callback

_HIGHER_IS_BETTER = (
    "accuracy", "acc", "auc", "precision", "recall", "f1_score", "fbeta_score", "r2_score", "iou",
    "pearson_correlation", "concordance_correlation", "cosine_similarity", "precision_at_recall",
    "recall_at_precision", "sensitivity_at_specificity", "specificity_at_sensitivity",
)
_LOWER_IS_BETTER = (
    "loss", "error", "mse", "mae", "mape", "msle", "crossentropy", "hinge", "kl_divergence", "kld", "poisson",
    "logcosh", "log_cosh", "huber",
)


def metric_direction(name: str) -> str | None:
    """"max", "min", or None when the name does not say (then ``mode`` must be given)."""
    name = name.removeprefix("val_")
    if name == "loss":
        return "min"
    for ending in _HIGHER_IS_BETTER:
        if name == ending or name.endswith("_" + ending):
            return "max"
    for ending in _LOWER_IS_BETTER:
        if name == ending or name.endswith("_" + ending) or name.endswith(ending):
            return "min"
    return None


class MonitorCallback(Callback):
    """Watches ``logs[monitor]``: ``mode`` "min"/"max"/"auto", improvement by more than ``min_delta``."""

    def __init__(self, monitor: str = "val_loss", mode: str = "auto", baseline: float | None = None,
                 min_delta: float = 0) -> None:
        super().__init__()
        if mode not in ("auto", "min", "max"):
            warnings.warn(f"{type(self).__name__} mode '{mode}' is unknown, fallback to auto mode.", stacklevel=3)
            mode = "auto"
        self.monitor, self.mode = monitor, mode
        self.best: float | None = baseline
        self.min_delta = abs(min_delta)
        self.monitor_op: Any = None
        self._resumed = False

    def _set_monitor_op(self) -> None:
        direction = self.mode if self.mode != "auto" else metric_direction(self.monitor)
        if direction is None:
            raise ValueError(
                f"{type(self).__name__} callback received monitor={self.monitor}, but dfit isn't able to "
                "automatically determine whether that metric should be maximized or minimized. Pass "
                "`mode='max'` in order to monitor based on the highest metric value, or pass `mode='min'` in "
                "order to use the lowest value.")
        self.monitor_op = np.less if direction == "min" else np.greater
        self.min_delta = -abs(self.min_delta) if direction == "min" else abs(self.min_delta)

    def _is_improvement(self, value: float, reference: float | None) -> bool:
        if reference is None:
            return True
        return bool(self.monitor_op(value - self.min_delta, reference))

    def _starting(self) -> bool:
        """In ``on_train_begin``: True to reset the counters, False once after ``load_state_dict``."""
        if self._resumed:
            self._resumed = False
            return False
        return True

    def _restored(self, state: Mapping[str, Any], *names: str) -> None:
        for name in names:
            if name in state:
                setattr(self, name, state[name])
        self._resumed = True
