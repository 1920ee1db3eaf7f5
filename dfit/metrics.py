"""Keras-named metrics as additive states (a sum and a count), reduced across ranks once per epoch.

A metric accumulates on the device during the epoch without any host synchronisation; ``MetricSet.results``
stacks every state into one tensor and does a single all-reduce, so epoch logs are exact over all samples
of all ranks. ``torchmetrics.Metric`` objects are accepted and synchronise themselves.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence

import torch

from . import distributed as dist
from . import losses as L

__all__ = [
    "get", "binary_accuracy", "categorical_accuracy", "sparse_categorical_accuracy",
    "top_k_categorical_accuracy", "sparse_top_k_categorical_accuracy", "MetricSet",
]


def binary_accuracy(y_true, y_pred, threshold: float = 0.5):
    y_true = L.align_targets(y_pred, y_true)
    return ((y_pred > threshold).to(y_true.dtype) == y_true).to(y_pred.dtype).mean(dim=-1)


def categorical_accuracy(y_true, y_pred):
    return (y_pred.argmax(dim=-1) == y_true.argmax(dim=-1)).to(y_pred.dtype)


def sparse_categorical_accuracy(y_true, y_pred):
    if y_true.dim() == y_pred.dim() and y_true.shape[-1] == 1:
        y_true = y_true.squeeze(-1)
    return (y_pred.argmax(dim=-1) == y_true.long()).to(y_pred.dtype)


def sparse_top_k_categorical_accuracy(y_true, y_pred, k: int = 5):
    if y_true.dim() == y_pred.dim() and y_true.shape[-1] == 1:
        y_true = y_true.squeeze(-1)
    top = y_pred.topk(min(k, y_pred.shape[-1]), dim=-1).indices
    return (top == y_true.long().unsqueeze(-1)).any(dim=-1).to(y_pred.dtype)


def top_k_categorical_accuracy(y_true, y_pred, k: int = 5):
    return sparse_top_k_categorical_accuracy(y_true.argmax(dim=-1), y_pred, k)


def cosine_similarity(y_true, y_pred):
    """The cosine of the angle between targets and predictions (+cos: the loss of the same name is -cos)."""
    return -L.cosine_similarity(y_true, y_pred)


_BY_NAME: dict[str, Callable] = {
    "binary_accuracy": binary_accuracy,
    "categorical_accuracy": categorical_accuracy,
    "sparse_categorical_accuracy": sparse_categorical_accuracy,
    "top_k_categorical_accuracy": top_k_categorical_accuracy,
    "sparse_top_k_categorical_accuracy": sparse_top_k_categorical_accuracy,
    "mean_squared_error": L.mean_squared_error, "mse": L.mean_squared_error,
    "root_mean_squared_error": L.mean_squared_error, "rmse": L.mean_squared_error,
    "mean_absolute_error": L.mean_absolute_error, "mae": L.mean_absolute_error,
    "mean_absolute_percentage_error": L.mean_absolute_percentage_error, "mape": L.mean_absolute_percentage_error,
    "mean_squared_logarithmic_error": L.mean_squared_logarithmic_error, "msle": L.mean_squared_logarithmic_error,
    "binary_crossentropy": L.binary_crossentropy, "categorical_crossentropy": L.categorical_crossentropy,
    "sparse_categorical_crossentropy": L.sparse_categorical_crossentropy,
    "kl_divergence": L.kl_divergence, "poisson": L.poisson, "hinge": L.hinge, "squared_hinge": L.squared_hinge,
    "categorical_hinge": L.categorical_hinge, "cosine_similarity": cosine_similarity, "log_cosh": L.log_cosh,
}
_SQRT_RESULT = {"root_mean_squared_error", "rmse"}


def _accuracy_for(loss_fn: Callable, y_pred: torch.Tensor, y_true: torch.Tensor) -> Callable:
    """Keras' resolution of 'accuracy' from the loss and the shapes of predictions and targets."""
    fn = getattr(loss_fn, "fn", None) or getattr(loss_fn, "module", None) or loss_fn
    logits = L.takes_logits(loss_fn)
    if fn is L.binary_crossentropy or isinstance(fn, (torch.nn.BCELoss, torch.nn.BCEWithLogitsLoss)) \
            or (y_pred.shape[-1] == 1 and y_pred.dim() > 1):
        threshold = 0.0 if logits else 0.5
        return lambda t, p: binary_accuracy(t, p, threshold)
    # Keras 3: by shapes, not dtypes: class indices have a lower rank (or a last axis of 1), else one-hot rows.
    sparse = y_true.dim() < y_pred.dim() or (y_true.shape[-1] == 1 and y_pred.shape[-1] > 1)
    return sparse_categorical_accuracy if sparse else categorical_accuracy


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class MeanMetric:
    """Mean of per-sample values over an epoch: state (sum of values, count or sum of weights)."""

    def __init__(self, name: str, fn: Callable | None, weighted: bool, output: int,
                 loss_fn: Callable | None = None, sqrt: bool = False):
        self.name, self.fn, self.weighted, self.output = name, fn, weighted, output
        self.loss_fn, self.sqrt = loss_fn, sqrt
        self.total: torch.Tensor | None = None
        self.count: Any = 0

    def reset(self, device: torch.device) -> None:
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device) if self.weighted else 0

    def update(self, y_pred: torch.Tensor, y_true: torch.Tensor, sample_weight: torch.Tensor | None) -> None:
        if self.fn is None:  # 'accuracy': resolved on first use, identically on every rank
            self.fn = _accuracy_for(self.loss_fn, y_pred, y_true)
        values = self.fn(y_true, y_pred)
        if self.weighted and sample_weight is not None:
            w = sample_weight
            while w.dim() < values.dim():
                w = w.unsqueeze(-1)
            w = w.expand_as(values).to(values.dtype)
            self.total.add_((values * w).sum())
            self.count.add_(w.sum())
        else:
            self.total.add_(values.sum())
            self.count = self.count + values.numel() if not self.weighted else self.count.add_(values.numel())

    def state(self) -> list[Any]:
        return [self.total, self.count]

    def result(self, total: float, count: float) -> float:
        value = total / count if count else 0.0
        return math.sqrt(value) if self.sqrt else value


class TorchMetric:
    """Adapter for a ``torchmetrics.Metric``: it keeps and synchronises its own state."""

    weighted = False

    def __init__(self, metric: Any, output: int, name: str | None = None):
        self.metric, self.output = metric, output
        self.name = name or _snake(type(metric).__name__)

    def reset(self, device: torch.device) -> None:
        self.metric.reset()
        self.metric.to(device)

    def update(self, y_pred, y_true, sample_weight) -> None:
        if len(y_pred):
            self.metric.update(y_pred, y_true)

    def state(self) -> list[Any]:
        return []

    def compute(self) -> float:
        return float(self.metric.compute())


def _is_torchmetric(obj: Any) -> bool:
    return any(c.__module__.startswith("torchmetrics") and c.__name__ == "Metric" for c in type(obj).__mro__)


def get(identifier: Any, *, weighted: bool, output: int, loss_fn: Callable | None, prefix: str = ""):
    """A metric object from a Keras name, a callable ``(y_true, y_pred) -> values``, or a torchmetrics Metric."""
    if isinstance(identifier, str):
        key = identifier.lower()
        if key in ("accuracy", "acc"):
            return MeanMetric(prefix + identifier, None, weighted, output, loss_fn)
        if key not in _BY_NAME:
            known = ", ".join(["accuracy", "acc", *sorted(_BY_NAME)])
            raise ValueError(f"Unknown metric {identifier!r}. Known names: {known}")
        return MeanMetric(prefix + identifier, _BY_NAME[key], weighted, output, sqrt=key in _SQRT_RESULT)
    if _is_torchmetric(identifier):
        if weighted:
            raise ValueError("torchmetrics metrics take no sample weights; pass them in metrics=, not weighted_metrics=")
        return TorchMetric(identifier, output, prefix + _snake(type(identifier).__name__))
    if callable(identifier):
        name = getattr(identifier, "__name__", None) or _snake(type(identifier).__name__)
        return MeanMetric(prefix + name, L.keras_order(identifier, "metric"), weighted, output)
    raise TypeError(f"a metric must be a name, a callable or a torchmetrics.Metric; got {type(identifier).__name__}")


def check(spec: Any) -> None:
    """Resolve every metric named in ``spec`` (nested lists/dicts) so a typo fails at compile time."""
    if spec is None:
        return
    if isinstance(spec, Mapping):
        spec = list(spec.values())
    if isinstance(spec, (list, tuple)):
        for item in spec:
            check(item)
        return
    get(spec, weighted=False, output=0, loss_fn=None)


def _spread(spec: Any, names: Sequence[str], what: str) -> list[list[Any]]:
    """Metrics per output: a flat list for every output, a list of lists by position, or a dict by name."""
    if spec is None:
        return [[] for _ in names]
    if isinstance(spec, Mapping):
        unknown = set(spec) - set(names)
        if unknown:
            raise ValueError(f"{what} names unknown outputs {sorted(unknown)}; outputs are {list(names)}")
        got = [spec.get(n, []) for n in names]
        return [list(g) if isinstance(g, (list, tuple)) else [g] for g in got]
    if not isinstance(spec, (list, tuple)):
        spec = [spec]
    if len(names) > 1 and spec and all(isinstance(s, (list, tuple)) for s in spec):
        if len(spec) != len(names):
            raise ValueError(f"{what} has {len(spec)} lists but the model has {len(names)} outputs")
        return [list(s) for s in spec]
    return [list(spec) for _ in names]


class MetricSet:
    """The loss trackers and the metrics of one loop, in Keras' log order: loss, metrics."""

    def __init__(self, compiled_loss: L.CompiledLoss | None, metrics: Any, weighted_metrics: Any,
                 output_names: Sequence[str]):
        self.compiled_loss = compiled_loss
        multi = len(output_names) > 1
        logged = compiled_loss.logged_outputs if compiled_loss is not None else []
        self.loss_names = ["loss"] + [f"{n}_loss" for n in logged]
        self.metrics: list[Any] = []
        for weighted, spec in ((False, metrics), (True, weighted_metrics)):
            for i, per_output in enumerate(_spread(spec, output_names, "weighted_metrics" if weighted else "metrics")):
                prefix = f"{output_names[i]}_" if multi else ""
                loss_fn = compiled_loss.fns[i] if compiled_loss is not None and not compiled_loss.from_model else None
                for ident in per_output:
                    self.metrics.append(get(ident, weighted=weighted, output=i, loss_fn=loss_fn, prefix=prefix))
        seen: set[str] = set(self.loss_names)
        for m in self.metrics:
            if m.name in seen:
                m.name = ("weighted_" if m.weighted else "") + m.name
            if m.name in seen:
                raise ValueError(f"two metrics are both named {m.name!r}")
            seen.add(m.name)
        self.loss_totals: list[torch.Tensor] = []
        self.samples = 0

    @property
    def names(self) -> list[str]:
        return (self.loss_names if self.compiled_loss else []) + [m.name for m in self.metrics]

    def reset(self, device: torch.device) -> None:
        self.loss_totals = [torch.zeros((), dtype=torch.float64, device=device) for _ in self.loss_names]
        self._pending: list[list[torch.Tensor]] = [[] for _ in self.loss_names]
        self._factors: list[list[float]] = [[] for _ in self.loss_names]
        self.samples = 0
        for m in self.metrics:
            m.reset(device)

    def update_loss(self, parts: list[tuple[torch.Tensor, float]], size: int) -> None:
        """Record this rank's summed losses of one batch (``value * factor`` each).

        No arithmetic on the step: values are kept and folded into float64 totals every
        ``FOLD_EVERY`` steps and at the end, in one operation per log entry.
        """
        for pending, factors, (value, factor) in zip(self._pending, self._factors, parts):
            pending.append(value.detach())
            factors.append(factor)
        self.samples += size
        if len(self._pending[0]) >= self.FOLD_EVERY:
            self._fold()

    FOLD_EVERY = 256

    def _fold(self) -> None:
        for total, pending, factors in zip(self.loss_totals, self._pending, self._factors):
            if pending:
                values = torch.stack(pending).to(torch.float64)
                total.add_(values @ torch.tensor(factors, dtype=torch.float64, device=values.device))
                pending.clear()
                factors.clear()

    def update_metrics(self, y_preds: list[torch.Tensor], y_trues: list[torch.Tensor],
                       sample_weight: torch.Tensor | None) -> None:
        for m in self.metrics:
            m.update(y_preds[m.output], y_trues[m.output], sample_weight)

    def _values(self, state: list[float], torch_results: dict[str, float]) -> dict[str, float]:
        logs: dict[str, float] = {}
        samples = state[len(self.loss_totals)]
        if self.compiled_loss:
            for name, total in zip(self.loss_names, state):
                logs[name] = total / samples if samples else 0.0
        i = len(self.loss_totals) + 1
        for m in self.metrics:
            if isinstance(m, TorchMetric):
                logs[m.name] = torch_results[m.name]
            else:
                logs[m.name] = m.result(state[i], state[i + 1])
                i += 2
        return logs

    def _state_vector(self, device: torch.device) -> torch.Tensor:
        self._fold()
        parts = [*self.loss_totals, torch.tensor(float(self.samples), dtype=torch.float64, device=device)]
        for m in self.metrics:
            for s in m.state():
                parts.append(s if isinstance(s, torch.Tensor) else torch.tensor(float(s), dtype=torch.float64,
                                                                                device=device))
        return torch.stack(parts)

    def results(self, device: torch.device) -> dict[str, float]:
        """Exact epoch values over all ranks: one all-reduce of every additive state."""
        reduced = dist.all_reduce_sum(self._state_vector(device)).tolist()
        torch_results = {m.name: m.compute() for m in self.metrics if isinstance(m, TorchMetric)}
        return self._values(reduced, torch_results)

    def running(self, device: torch.device) -> dict[str, float]:
        """This rank's running values (for the progress bar): no communication."""
        local = self._state_vector(device).tolist()
        return self._values(local, {m.name: float("nan") for m in self.metrics if isinstance(m, TorchMetric)})
