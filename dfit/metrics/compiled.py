"""The metrics of one loop (train or validation): Keras 3's resolution, spreading over outputs and naming,
and the single all-reduce per epoch that makes every log exact over all ranks.

Every metric is a ``dfit.metrics.Metric`` whose states are additive; ``MetricSet.results`` stacks the loss
totals and every metric state into one float64 vector, sums it over ranks, and computes each ``result()``
from the summed states. ``torchmetrics.Metric`` objects are accepted and synchronise themselves.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Mapping, Sequence

import torch

from .. import distributed as dist
from .. import losses as L
from . import classes as C
from . import confusion as CM
from . import functions as fns
from .base import Mean, MeanMetricWrapper, Metric, Sum, snake_case

__all__ = ["get", "check", "MetricSet"]

_FUNCTIONS = {
    "binary_accuracy": fns.binary_accuracy,
    "categorical_accuracy": fns.categorical_accuracy,
    "sparse_categorical_accuracy": fns.sparse_categorical_accuracy,
    "top_k_categorical_accuracy": fns.top_k_categorical_accuracy,
    "sparse_top_k_categorical_accuracy": fns.sparse_top_k_categorical_accuracy,
    "mean_squared_error": L.mean_squared_error, "mse": L.mean_squared_error,
    "mean_absolute_error": L.mean_absolute_error, "mae": L.mean_absolute_error,
    "mean_absolute_percentage_error": L.mean_absolute_percentage_error, "mape": L.mean_absolute_percentage_error,
    "mean_squared_logarithmic_error": L.mean_squared_logarithmic_error, "msle": L.mean_squared_logarithmic_error,
    "binary_crossentropy": L.binary_crossentropy, "categorical_crossentropy": L.categorical_crossentropy,
    "sparse_categorical_crossentropy": L.sparse_categorical_crossentropy,
    "kl_divergence": L.kl_divergence, "kld": L.kl_divergence, "poisson": L.poisson, "hinge": L.hinge,
    "squared_hinge": L.squared_hinge, "categorical_hinge": L.categorical_hinge,
    "cosine_similarity": fns.cosine_similarity, "log_cosh": L.log_cosh, "logcosh": L.log_cosh,
}
_CLASSES: dict[str, type] = {
    cls.__name__: cls for cls in [getattr(C, n) for n in C.__all__] + [getattr(CM, n) for n in CM.__all__]
}
_BY_SNAKE = {snake_case(name): cls for name, cls in _CLASSES.items() if snake_case(name) not in _FUNCTIONS}
_BY_SNAKE.update({"auc": CM.AUC, "root_mean_squared_error": C.RootMeanSquaredError,
                  "rmse": C.RootMeanSquaredError, "accuracy": None, "acc": None})


def _known_names() -> str:
    return ", ".join(sorted(set(_FUNCTIONS) | set(_BY_SNAKE) | set(_CLASSES)))


class ShapeResolvedAccuracy(MeanMetricWrapper):
    """'accuracy'/'acc' as Keras 3 resolves it on the first batch, from the shapes of targets and predictions:
    a last axis of 1 -> binary accuracy (threshold 0.5), targets of lower rank (or a last axis of 1 against
    several classes) -> sparse categorical, else categorical accuracy. The loss plays no part."""

    def __init__(self, name: str = "accuracy", dtype: Any = None):
        super().__init__(self._resolve, name=name, dtype=dtype)

    def _resolve(self, y_true, y_pred):
        binary = y_pred.shape[-1] == 1 if y_pred.dim() else True
        sparse = y_true.dim() < y_pred.dim() or (y_true.shape[-1] == 1 and y_pred.shape[-1] > 1)
        self._fn = fns.binary_accuracy if binary else (
            fns.sparse_categorical_accuracy if sparse else fns.categorical_accuracy)
        return self._fn(y_true, y_pred)


class TorchMetric:
    """Adapter for a ``torchmetrics.Metric``: it keeps and synchronises its own state (a private copy)."""

    def __init__(self, metric: Any, weighted: bool):
        self.metric = copy.deepcopy(metric)
        self.name = snake_case(type(metric).__name__)
        self.weight_argument = None
        if weighted:
            params = inspect.signature(self.metric.update).parameters
            self.weight_argument = next((p for p in ("sample_weight", "sample_weights", "weight", "weights")
                                         if p in params), None)
            if self.weight_argument is None:
                raise ValueError(
                    f"the torchmetrics metric {type(metric).__name__} takes no sample weights (its update() has no "
                    "weight argument); pass it in metrics=, not weighted_metrics=")

    def reset(self, device: torch.device) -> None:
        self.metric.reset()
        self.metric.to(device)

    def update_state(self, y_true, y_pred, sample_weight=None) -> None:
        if len(y_pred):
            if self.weight_argument is not None and sample_weight is not None:
                self.metric.update(y_pred, y_true, **{self.weight_argument: sample_weight})
            else:
                self.metric.update(y_pred, y_true)

    def compute(self) -> Any:
        return _plain(self.metric.compute())


def _is_torchmetric(obj: Any) -> bool:
    return any(c.__module__.startswith("torchmetrics") and c.__name__ == "Metric" for c in type(obj).__mro__)


def get(identifier: Any, weighted: bool = False) -> Metric | TorchMetric:
    """A fresh metric object for a Keras name ("mae", "accuracy", "auc", "Precision", ...), a ``Metric`` (copied,
    so the caller's object is never updated), a ``Metric`` class, a callable ``(y_true, y_pred) -> values``
    or a ``torchmetrics.Metric``. A name keeps the spelling the user wrote as the metric's name."""
    if isinstance(identifier, str):
        key = identifier if identifier in _CLASSES else identifier.lower()
        if key in ("accuracy", "acc"):
            return ShapeResolvedAccuracy(name=identifier)
        if key in _CLASSES:
            return _CLASSES[key](name=identifier)
        if key in _FUNCTIONS:
            return MeanMetricWrapper(_FUNCTIONS[key], name=identifier)
        if key in _BY_SNAKE:
            return _BY_SNAKE[key](name=identifier)
        raise ValueError(f"Unknown metric {identifier!r}. Known names: {_known_names()}")
    if isinstance(identifier, type) and issubclass(identifier, Metric):
        return identifier()
    if isinstance(identifier, Metric):
        if isinstance(identifier, (Mean, Sum)) and not isinstance(identifier, MeanMetricWrapper) \
                and type(identifier).update_state in (Mean.update_state, Sum.update_state):
            raise TypeError(f"{type(identifier).__name__} averages values it is given, not (y_true, y_pred); "
                            "use MeanMetricWrapper(fn) in compile()")
        return copy.deepcopy(identifier)
    if _is_torchmetric(identifier):
        return TorchMetric(identifier, weighted)
    if callable(identifier):
        fn = L.keras_order(identifier, "metric")
        name = getattr(identifier, "__name__", None) or snake_case(type(identifier).__name__)
        return MeanMetricWrapper(fn, name=name)
    raise TypeError(f"a metric must be a name, a dfit.metrics.Metric, a callable or a torchmetrics.Metric; "
                    f"got {type(identifier).__name__}")


def check(spec: Any, weighted: bool = False) -> None:
    """Resolve every metric named in ``spec`` (nested lists/dicts) so a typo fails at compile time."""
    if spec is None:
        return
    if isinstance(spec, Mapping):
        spec = list(spec.values())
    if isinstance(spec, (list, tuple)):
        for item in spec:
            check(item, weighted)
        return
    get(spec, weighted)


def _flatten(spec: Any) -> list[Any]:
    if spec is None:
        return []
    if isinstance(spec, Mapping):
        spec = list(spec.values())
    if isinstance(spec, (list, tuple)):
        return [m for s in spec for m in _flatten(s)]
    return [spec]


def _spread(spec: Any, names: Sequence[str], what: str) -> list[list[Any]]:
    """Keras 3: one output takes every metric given; several outputs take a list with one entry (a metric or a
    list of metrics) per output, by position, or a dict by output name."""
    if not spec:
        return [[] for _ in names]
    if len(names) == 1:
        return [_flatten(spec)]
    if isinstance(spec, Mapping):
        unknown = set(spec) - set(names)
        if unknown:
            raise ValueError(f"{what} names unknown outputs {sorted(unknown)}; outputs are {list(names)}")
        return [_flatten(spec.get(n)) for n in names]
    if isinstance(spec, (list, tuple)) and len(spec) == len(names):
        return [_flatten(s) for s in spec]
    raise ValueError(
        f"Invalid `{what}`: for a model with {len(names)} outputs {list(names)}, `{what}` should be a list with one "
        f"entry per output (a metric or a list of metrics) or a dict by output name, and match the output "
        f"structure of the model. Received: {what}={spec!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.detach().cpu().tolist()
    return float(value) if isinstance(value, (int, float)) else value


class _Entry:
    def __init__(self, metric: Metric | TorchMetric, output: int, weighted: bool):
        self.metric, self.output, self.weighted = metric, output, weighted
        self.name = metric.name


class MetricSet:
    """The loss trackers and the metrics of one loop, in Keras' log order: loss, metrics, weighted metrics."""

    FOLD_EVERY = 256

    def __init__(self, compiled_loss: L.CompiledLoss | None, metrics: Any, weighted_metrics: Any,
                 output_names: Sequence[str]):
        self.compiled_loss = compiled_loss
        multi = len(output_names) > 1
        logged = compiled_loss.logged_outputs if compiled_loss is not None else []
        self.loss_names = ["loss"] + [f"{n}_loss" for n in logged]
        self.entries: list[_Entry] = []
        counters: dict[str, int] = {}
        for weighted, spec in ((False, metrics), (True, weighted_metrics)):
            what = "weighted_metrics" if weighted else "metrics"
            for i, per_output in enumerate(_spread(spec, output_names, what)):
                prefix = f"{output_names[i]}_" if multi else ""
                for ident in per_output:
                    entry = _Entry(get(ident, weighted), i, weighted)
                    entry.name = self._unique(prefix, entry.name, weighted, counters)
                    self.entries.append(entry)
        clash = set(self.loss_names) & {e.name for e in self.entries}
        if clash:
            raise ValueError(f"metric names {sorted(clash)} clash with the loss entries of the logs")
        self.loss_totals: list[torch.Tensor] = []
        self.samples = 0

    @staticmethod
    def _unique(prefix: str, name: str, weighted: bool, counters: dict[str, int]) -> str:
        """Keras 3's naming: output prefix; a clashing plain metric gets ``_1``, ``_2``...; a clashing weighted
        metric gets ``weighted_`` after the prefix (then ``_1``... if that clashes too)."""
        full = prefix + name
        if full not in counters:
            counters[full] = 1
            return full
        if weighted:
            full = f"{prefix}weighted_{name}"
            if full not in counters:
                counters[full] = 1
                return full
        index = counters[full]
        counters[full] += 1
        return f"{full}_{index}"

    @property
    def metrics(self) -> list[_Entry]:
        return self.entries

    @property
    def names(self) -> list[str]:
        return (self.loss_names if self.compiled_loss else []) + [e.name for e in self.entries]

    def reset(self, device: torch.device) -> None:
        self.loss_totals = [torch.zeros((), dtype=torch.float64, device=device) for _ in self.loss_names]
        self._pending: list[list[torch.Tensor]] = [[] for _ in self.loss_names]
        self._factors: list[list[float]] = [[] for _ in self.loss_names]
        self.samples = 0
        for e in self.entries:
            if isinstance(e.metric, TorchMetric):
                e.metric.reset(device)
            else:
                e.metric.to(device)
                e.metric.reset_state()
                e.metric.to(device)

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

    def _fold(self) -> None:
        for total, pending, factors in zip(self.loss_totals, self._pending, self._factors):
            if pending:
                values = torch.stack(pending).to(torch.float64)
                total.add_(values @ torch.tensor(factors, dtype=torch.float64, device=values.device))
                pending.clear()
                factors.clear()

    def update_metrics(self, y_preds: list[torch.Tensor], y_trues: list[torch.Tensor],
                       sample_weight: torch.Tensor | None) -> None:
        for e in self.entries:
            e.metric.update_state(y_trues[e.output], y_preds[e.output], sample_weight if e.weighted else None)

    def _dfit_metrics(self) -> list[Metric]:
        return [e.metric for e in self.entries if not isinstance(e.metric, TorchMetric)]

    def _state_vector(self, device: torch.device) -> torch.Tensor:
        self._fold()
        parts = [torch.stack(self.loss_totals) if self.loss_totals else torch.zeros(0, dtype=torch.float64,
                                                                                   device=device),
                 torch.tensor([float(self.samples)], dtype=torch.float64, device=device)]
        for m in self._dfit_metrics():
            parts.extend(v.value.detach().reshape(-1).to(device=device, dtype=torch.float64) for v in m.variables)
        return torch.cat(parts)

    def _values(self, state: torch.Tensor, torch_results: dict[int, Any], summed: bool) -> dict[str, Any]:
        logs: dict[str, Any] = {}
        n = len(self.loss_totals)
        flat = state.tolist()
        samples = flat[n]
        if self.compiled_loss:
            for name, total in zip(self.loss_names, flat[:n]):
                logs[name] = total / samples if samples else 0.0
        offset = n + 1
        for k, e in enumerate(self.entries):
            if isinstance(e.metric, TorchMetric):
                logs[e.name] = torch_results[k]
                continue
            variables = e.metric.variables
            size = sum(v.numel() for v in variables)
            if summed:
                logs[e.name] = _plain(self._result_from(e.metric, state[offset:offset + size]))
            else:
                logs[e.name] = _plain(e.metric.result())
            offset += size
        return logs

    @staticmethod
    def _result_from(metric: Metric, values: torch.Tensor) -> Any:
        """``metric.result()`` computed from the given (summed) states; the metric's own states are restored."""
        variables = metric.variables
        local = [v.value.clone() for v in variables]
        with torch.no_grad():
            offset = 0
            for v in variables:
                v.copy_(values[offset:offset + v.numel()].reshape(v.shape).to(v.device, v.dtype))
                offset += v.numel()
            try:
                return _plain(metric.result())  # now: result() may be a view of a state restored below
            finally:
                for v, saved in zip(variables, local):
                    v.copy_(saved)

    def summed_state(self, device: torch.device) -> torch.Tensor:
        """Every additive state (loss totals, samples, metric states) summed over all ranks, on the CPU (one
        all-reduce): what a backup keeps of a partial epoch. ``torchmetrics`` metrics are not included."""
        return dist.all_reduce_sum(self._state_vector(device)).cpu()

    def load_summed_state(self, state: torch.Tensor, keep: bool) -> None:
        """After ``reset``: put ``summed_state()``'s output back on ONE rank (``keep``; the others keep zero
        states), so the epoch-end all-reduce over any number of ranks gives the uninterrupted run's sums."""
        expected = self._state_vector(self.loss_totals[0].device if self.loss_totals else torch.device("cpu"))
        if state.numel() != expected.numel():
            raise ValueError(f"the backup's metric states have {state.numel()} values; this model's metrics have "
                             f"{expected.numel()} (the metrics changed since the backup was written)")
        if not keep:
            return
        n = len(self.loss_totals)
        with torch.no_grad():
            for total, value in zip(self.loss_totals, state[:n]):
                total.fill_(float(value))
            self.samples = int(round(float(state[n])))
            offset = n + 1
            for m in self._dfit_metrics():
                for v in m.variables:
                    v.copy_(state[offset:offset + v.numel()].reshape(v.shape).to(v.device, v.dtype))
                    offset += v.numel()

    def results(self, device: torch.device) -> dict[str, Any]:
        """Exact epoch values over all ranks: one all-reduce of every additive state."""
        reduced = dist.all_reduce_sum(self._state_vector(device))
        torch_results = {k: e.metric.compute() for k, e in enumerate(self.entries) if isinstance(e.metric, TorchMetric)}
        return self._values(reduced, torch_results, summed=True)

    def running(self, device: torch.device) -> dict[str, Any]:
        """This rank's running values (for the progress bar): no communication."""
        local = self._state_vector(device)
        return self._values(local, {k: float("nan") for k, e in enumerate(self.entries)
                                    if isinstance(e.metric, TorchMetric)}, summed=False)
