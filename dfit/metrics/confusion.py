"""Confusion-matrix metrics (TruePositives, ..., Precision, Recall, AUC) from additive counts at thresholds.

Each batch adds, for every threshold, the (weighted) number of true/false positives among predictions
strictly above it. The counts are histograms: every prediction falls in one bucket (how many thresholds
lie below it), and a reversed cumulative sum turns buckets into counts per threshold — one scatter-add per
batch, no loop over thresholds and no host synchronisation. Evenly spaced thresholds (AUC's default) place
predictions exactly as Keras does: clipped to [0, 1], bucket ``ceil(p * (T - 1))``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .. import losses as L
from .base import Metric, as_tensor

__all__ = ["TruePositives", "FalsePositives", "TrueNegatives", "FalseNegatives", "Precision", "Recall", "AUC"]

EPSILON = 1e-7


def _divide_no_nan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b != 0, a / torch.where(b != 0, b, torch.ones_like(b)), torch.zeros_like(a))


def _thresholds(thresholds: Any, default: float) -> list[float]:
    values = [default] if thresholds is None else (
        [float(thresholds)] if np.isscalar(thresholds) else [float(t) for t in thresholds])
    if thresholds is not None and any(not 0.0 <= t <= 1.0 for t in values):
        raise ValueError(f"thresholds must be in [0, 1]; got {thresholds!r}")
    return values


def _evenly_spaced(values: Sequence[float]) -> bool:
    n = len(values)
    return n >= 3 and np.allclose(values, np.arange(n) / (n - 1), atol=EPSILON)


class _Counter:
    """Weighted counts of positives and negatives above each of a fixed set of thresholds."""

    def __init__(self, thresholds: Sequence[float], even: bool, with_epsilon: bool = False):
        self.values = np.asarray(thresholds, dtype=np.float64)
        self.even, self.with_epsilon = even, with_epsilon
        self._on: dict[torch.device, torch.Tensor] = {}

    def _on_device(self, device: torch.device) -> torch.Tensor:
        if device not in self._on:
            self._on[device] = torch.as_tensor(self.values, dtype=torch.float64, device=device)
        return self._on[device]

    def buckets(self, y_pred: torch.Tensor) -> torch.Tensor:
        """For each prediction, how many thresholds lie strictly below it (0 .. T)."""
        n = len(self.values)
        if self.even:
            k = torch.ceil(y_pred.clamp(0.0, 1.0) * (n - 1))
            if self.with_epsilon:
                k = k.clamp_min(1.0)
            return k.long()
        return torch.searchsorted(self._on_device(y_pred.device), y_pred.contiguous())

    def count(self, y_true: torch.Tensor, y_pred: torch.Tensor, weights: torch.Tensor | None,
              labels: int | None) -> tuple[torch.Tensor, ...]:
        """(tp, fp, positives, negatives): tp/fp per threshold (T,) or (T, labels); totals () or (labels,)."""
        n = len(self.values)
        positive = (y_true != 0).to(torch.float64)
        w = torch.ones_like(positive) if weights is None else weights
        pos_w, neg_w = positive * w, (1.0 - positive) * w
        k = self.buckets(y_pred)
        if labels is None:
            index, bins = k.reshape(-1), n + 1
            pos_w, neg_w = pos_w.reshape(-1), neg_w.reshape(-1)
        else:
            index = (k * labels + torch.arange(labels, device=k.device)).reshape(-1)
            bins = (n + 1) * labels
            pos_w, neg_w = pos_w.reshape(-1), neg_w.reshape(-1)
        out = []
        for values in (pos_w, neg_w):
            hist = torch.zeros(bins, dtype=torch.float64, device=values.device).index_add_(0, index, values)
            if labels is not None:
                hist = hist.reshape(n + 1, labels)
            above = hist[1:].flip(0).cumsum(0).flip(0)  # above[i] = sum of buckets > i
            out.append(above)
        tp, fp = out
        positives = pos_w.reshape(-1, labels).sum(0) if labels is not None else pos_w.sum()
        negatives = neg_w.reshape(-1, labels).sum(0) if labels is not None else neg_w.sum()
        return tp, fp, positives, negatives


def _prepare(y_true, y_pred, sample_weight, top_k: int | None = None, class_id: int | None = None):
    """Float64 predictions, targets of the same shape, weights broadcast to them; top_k/class_id applied."""
    y_pred = as_tensor(y_pred).to(torch.float64)
    y_true = L.align_targets(y_pred, as_tensor(y_true, y_pred)).to(torch.float64)
    if y_true.shape != y_pred.shape:
        y_true = y_true.reshape(y_pred.shape)
    w = None
    if sample_weight is not None:
        w = as_tensor(sample_weight, y_pred).to(torch.float64)
        while w.dim() > y_pred.dim() and w.shape[-1] == 1:
            w = w.squeeze(-1)
        w = w.reshape(w.shape + (1,) * (y_pred.dim() - w.dim())).expand_as(y_pred)
    if top_k is not None:
        keep = torch.zeros_like(y_pred, dtype=torch.bool).scatter_(
            -1, y_pred.topk(min(top_k, y_pred.shape[-1]), dim=-1).indices, True)
        y_pred = torch.where(keep, y_pred, torch.full_like(y_pred, -np.inf))
    if class_id is not None:
        if y_pred.dim() < 2:
            raise ValueError(f"class_id needs predictions of shape (samples, classes); got {tuple(y_pred.shape)}")
        y_pred, y_true = y_pred[..., class_id], y_true[..., class_id]
        w = None if w is None else w[..., class_id]
    return y_true, y_pred, w


class _ConfusionCount(Metric):
    """One confusion-matrix entry at one or more thresholds (Keras: default threshold 0.5)."""

    _entry = ""

    def __init__(self, thresholds: Any = None, name: str | None = None, dtype: Any = None):
        super().__init__(name=name, dtype=dtype)
        self.init_thresholds = thresholds
        self.thresholds = _thresholds(thresholds, 0.5)
        self._counter = _Counter(self.thresholds, _evenly_spaced(self.thresholds))
        self.accumulator = self.add_variable(shape=(len(self.thresholds),), name="accumulator")

    def update_state(self, y_true, y_pred, sample_weight=None) -> None:
        tp, fp, pos, neg = self._counter.count(*_prepare(y_true, y_pred, sample_weight), labels=None)
        self.accumulator.add_({"tp": tp, "fp": fp, "tn": neg - fp, "fn": pos - tp}[self._entry])

    def result(self) -> torch.Tensor:
        return self.accumulator.value[0] if len(self.thresholds) == 1 else self.accumulator.value.clone()

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "thresholds": self.init_thresholds}


class TruePositives(_ConfusionCount):
    """The (weighted) number of positive targets predicted above the threshold."""
    _entry = "tp"


class FalsePositives(_ConfusionCount):
    """The (weighted) number of negative targets predicted above the threshold."""
    _entry = "fp"


class TrueNegatives(_ConfusionCount):
    """The (weighted) number of negative targets predicted at or below the threshold."""
    _entry = "tn"


class FalseNegatives(_ConfusionCount):
    """The (weighted) number of positive targets predicted at or below the threshold."""
    _entry = "fn"


class _PrecisionRecall(Metric):
    def __init__(self, thresholds: Any = None, top_k: int | None = None, class_id: int | None = None,
                 name: str | None = None, dtype: Any = None):
        super().__init__(name=name, dtype=dtype)
        self.init_thresholds, self.top_k, self.class_id = thresholds, top_k, class_id
        self.thresholds = _thresholds(thresholds, 0.5) if thresholds is not None or top_k is None else [-np.inf]
        self._counter = _Counter(self.thresholds, _evenly_spaced(self.thresholds))
        self.true_positives = self.add_variable(shape=(len(self.thresholds),), name="true_positives")
        self.other = self.add_variable(shape=(len(self.thresholds),), name=self._other_name)

    def _counts(self, y_true, y_pred, sample_weight):
        return self._counter.count(*_prepare(y_true, y_pred, sample_weight, self.top_k, self.class_id), labels=None)

    def result(self) -> torch.Tensor:
        tp = self.true_positives.value
        value = _divide_no_nan(tp, tp + self.other.value)
        return value[0] if len(self.thresholds) == 1 else value

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "thresholds": self.init_thresholds, "top_k": self.top_k,
                "class_id": self.class_id}


class Precision(_PrecisionRecall):
    """tp / (tp + fp) at each threshold (or among the top_k predictions, or for one class_id)."""

    _other_name = "false_positives"

    def update_state(self, y_true, y_pred, sample_weight=None) -> None:
        tp, fp, _, _ = self._counts(y_true, y_pred, sample_weight)
        self.true_positives.add_(tp)
        self.other.add_(fp)

    @property
    def false_positives(self):
        return self.other


class Recall(_PrecisionRecall):
    """tp / (tp + fn) at each threshold (or among the top_k predictions, or for one class_id)."""

    _other_name = "false_negatives"

    def update_state(self, y_true, y_pred, sample_weight=None) -> None:
        tp, _, pos, _ = self._counts(y_true, y_pred, sample_weight)
        self.true_positives.add_(tp)
        self.other.add_(pos - tp)

    @property
    def false_negatives(self):
        return self.other


class AUC(Metric):
    """Area under the ROC or PR curve, from confusion counts at ``num_thresholds`` thresholds (Keras' method).

    Thresholds are ``i / (num_thresholds - 1)`` for the inner ones plus ``-1e-7`` and ``1 + 1e-7``; the area is
    a Riemann sum ("interpolation": trapezoids, or Davis & Goadrich's interpolation for PR; "minoring";
    "majoring"). ``multi_label=True`` keeps counts per label and averages the labels' AUCs.
    """

    def __init__(self, num_thresholds: int = 200, curve: str = "ROC", summation_method: str = "interpolation",
                 name: str | None = None, dtype: Any = None, thresholds: Sequence[float] | None = None,
                 multi_label: bool = False, num_labels: int | None = None, label_weights: Any = None,
                 from_logits: bool = False):
        super().__init__(name=name, dtype=dtype)
        self.curve = str(curve).upper()
        if self.curve not in ("ROC", "PR"):
            raise ValueError(f"curve must be 'ROC' or 'PR'; got {curve!r}")
        self.summation_method = str(summation_method).lower()
        if self.summation_method not in ("interpolation", "minoring", "majoring"):
            raise ValueError("summation_method must be 'interpolation', 'minoring' or 'majoring'; "
                             f"got {summation_method!r}")
        if thresholds is not None:
            inner = sorted(_thresholds(thresholds, 0.5))
            even = _evenly_spaced([0.0] + inner + [1.0])
        else:
            if num_thresholds <= 1:
                raise ValueError(f"num_thresholds must be an integer > 1; got {num_thresholds}")
            inner = [(i + 1) / (num_thresholds - 1) for i in range(num_thresholds - 2)]
            even = True
        self.num_thresholds = len(inner) + 2
        self._thresholds = [0.0 - EPSILON] + inner + [1.0 + EPSILON]
        self._counter = _Counter(self._thresholds, even, with_epsilon=True)
        if num_labels is not None and not multi_label:
            raise ValueError("num_labels is needed only when multi_label=True")
        self.multi_label, self.num_labels, self.from_logits = bool(multi_label), num_labels, bool(from_logits)
        self.label_weights = None if label_weights is None else torch.as_tensor(label_weights, dtype=torch.float64)
        self._init = dict(num_thresholds=num_thresholds, curve=curve, summation_method=summation_method,
                          thresholds=thresholds, multi_label=multi_label, num_labels=num_labels,
                          label_weights=label_weights, from_logits=from_logits)
        self._built = False
        if not self.multi_label or num_labels:
            self._build(num_labels)

    @property
    def thresholds(self) -> list[float]:
        return list(self._thresholds)

    def _build(self, labels: int | None) -> None:
        shape = (self.num_thresholds,) if labels is None else (self.num_thresholds, labels)
        self.true_positives = self.add_variable(shape=shape, name="true_positives")
        self.false_positives = self.add_variable(shape=shape, name="false_positives")
        self.true_negatives = self.add_variable(shape=shape, name="true_negatives")
        self.false_negatives = self.add_variable(shape=shape, name="false_negatives")
        self._labels = labels
        self._built = True

    def update_state(self, y_true, y_pred, sample_weight=None) -> None:
        y_true, y_pred, w = _prepare(y_true, y_pred, sample_weight)
        if self.from_logits:
            y_pred = torch.sigmoid(y_pred)
        if self.multi_label:
            if y_pred.dim() != 2:
                raise ValueError(f"multi_label=True needs predictions of rank 2; got shape {tuple(y_pred.shape)}")
            if not self._built:
                self._build(y_pred.shape[1])
            self.to(y_pred.device)
        elif self.label_weights is not None:
            lw = self.label_weights.to(y_pred.device).expand_as(y_pred)
            w = lw if w is None else w * lw
        tp, fp, pos, neg = self._counter.count(y_true, y_pred, w, labels=self._labels)
        self.true_positives.add_(tp)
        self.false_positives.add_(fp)
        self.true_negatives.add_(neg - fp)
        self.false_negatives.add_(pos - tp)

    def _average(self, by_label: torch.Tensor) -> torch.Tensor:
        if not self.multi_label:
            return by_label
        if self.label_weights is None:
            return by_label.mean()
        lw = self.label_weights.to(by_label.device)
        return _divide_no_nan((by_label * lw).sum(), lw.sum())

    def _pr_interpolated(self, tp, fp, fn) -> torch.Tensor:
        """Davis & Goadrich: precision varies as TP and TP + FP vary linearly between thresholds."""
        predicted = tp + fp
        d_tp = tp[:-1] - tp[1:]
        d_pred = predicted[:-1] - predicted[1:]
        slope = _divide_no_nan(d_tp, d_pred.clamp_min(0.0))
        intercept = tp[1:] - slope * predicted[1:]
        both = (predicted[:-1] > 0) & (predicted[1:] > 0)
        ratio = torch.where(both, _divide_no_nan(predicted[:-1], predicted[1:].clamp_min(0.0)),
                            torch.ones_like(predicted[1:]))
        area = _divide_no_nan(slope * (d_tp + intercept * torch.log(ratio)), (tp[1:] + fn[1:]).clamp_min(0.0))
        return self._average(area.sum(0))

    def result(self) -> torch.Tensor:
        if not self._built:
            return torch.zeros((), dtype=torch.float64)
        tp, fp = self.true_positives.value, self.false_positives.value
        tn, fn = self.true_negatives.value, self.false_negatives.value
        if self.curve == "PR" and self.summation_method == "interpolation":
            return self._pr_interpolated(tp, fp, fn)
        recall = _divide_no_nan(tp, tp + fn)
        if self.curve == "ROC":
            x, y = _divide_no_nan(fp, fp + tn), recall
        else:
            x, y = recall, _divide_no_nan(tp, tp + fp)
        if self.summation_method == "interpolation":
            heights = (y[:-1] + y[1:]) / 2.0
        elif self.summation_method == "minoring":
            heights = torch.minimum(y[:-1], y[1:])
        else:
            heights = torch.maximum(y[:-1], y[1:])
        return self._average(((x[:-1] - x[1:]) * heights).sum(0))

    def reset_state(self) -> None:
        if self._built:
            super().reset_state()

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), **self._init}
