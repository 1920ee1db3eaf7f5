"""Keras-named losses, and the weighting and global-batch normalisation every loss goes through.

A loss function here returns per-sample values: shape (batch,) or (batch, timesteps), the last axis of
the targets already reduced (the Keras convention). ``CompiledLoss`` weights them and normalises by the
GLOBAL batch, so DDP's averaged gradient equals the single-process gradient of the same global batch.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

EPSILON = 1e-7

__all__ = [
    "get", "CompiledLoss", "mean_squared_error", "mean_absolute_error", "mean_absolute_percentage_error",
    "mean_squared_logarithmic_error", "binary_crossentropy", "categorical_crossentropy",
    "sparse_categorical_crossentropy", "huber", "kl_divergence", "poisson", "hinge", "squared_hinge",
    "categorical_hinge", "cosine_similarity", "log_cosh", "BinaryCrossentropy", "CategoricalCrossentropy",
    "SparseCategoricalCrossentropy", "Huber",
]


def align_targets(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    """Give y_true y_pred's rank where Keras would: (b,) targets against (b, 1) predictions.

    Without this, torch broadcasting would silently turn (b,) - (b, 1) into a (b, b) matrix.
    """
    if y_true.dim() == y_pred.dim() - 1 and y_pred.shape[-1] == 1:
        y_true = y_true.unsqueeze(-1)
    elif y_true.dim() == y_pred.dim() + 1 and y_true.shape[-1] == 1:
        y_true = y_true.squeeze(-1)
    if y_true.dtype != y_pred.dtype and y_pred.is_floating_point():
        y_true = y_true.to(y_pred.dtype)
    return y_true


def mean_squared_error(y_pred, y_true):
    return (y_pred - align_targets(y_pred, y_true)).square().mean(dim=-1)


def mean_absolute_error(y_pred, y_true):
    return (y_pred - align_targets(y_pred, y_true)).abs().mean(dim=-1)


def mean_absolute_percentage_error(y_pred, y_true):
    y_true = align_targets(y_pred, y_true)
    return 100.0 * ((y_true - y_pred) / y_true.abs().clamp_min(EPSILON)).abs().mean(dim=-1)


def mean_squared_logarithmic_error(y_pred, y_true):
    y_true = align_targets(y_pred, y_true)
    first = torch.log1p(y_pred.clamp_min(EPSILON))
    second = torch.log1p(y_true.clamp_min(EPSILON))
    return (first - second).square().mean(dim=-1)


def binary_crossentropy(y_pred, y_true, from_logits: bool = False, label_smoothing: float = 0.0):
    y_true = align_targets(y_pred, y_true)
    if label_smoothing:
        y_true = y_true * (1.0 - label_smoothing) + 0.5 * label_smoothing
    if from_logits:
        return F.binary_cross_entropy_with_logits(y_pred, y_true, reduction="none").mean(dim=-1)
    p = y_pred.clamp(EPSILON, 1.0 - EPSILON)
    return -(y_true * torch.log(p) + (1.0 - y_true) * torch.log1p(-p)).mean(dim=-1)


def categorical_crossentropy(y_pred, y_true, from_logits: bool = False, label_smoothing: float = 0.0):
    y_true = align_targets(y_pred, y_true)
    if label_smoothing:
        y_true = y_true * (1.0 - label_smoothing) + label_smoothing / y_pred.shape[-1]
    if from_logits:
        return -(y_true * F.log_softmax(y_pred, dim=-1)).sum(dim=-1)
    p = (y_pred / y_pred.sum(dim=-1, keepdim=True)).clamp(EPSILON, 1.0 - EPSILON)
    return -(y_true * torch.log(p)).sum(dim=-1)


def sparse_categorical_crossentropy(y_pred, y_true, from_logits: bool = False, ignore_class: int | None = None):
    if y_true.dim() == y_pred.dim() and y_true.shape[-1] == 1:
        y_true = y_true.squeeze(-1)
    y_true = y_true.long()
    if from_logits and ignore_class is None:  # one fused kernel
        return F.cross_entropy(y_pred.movedim(-1, 1) if y_pred.dim() > 2 else y_pred, y_true, reduction="none")
    if from_logits:
        logp = F.log_softmax(y_pred, dim=-1)
    else:
        p = (y_pred / y_pred.sum(dim=-1, keepdim=True)).clamp(EPSILON, 1.0 - EPSILON)
        logp = torch.log(p)
    if ignore_class is not None:
        keep = y_true != ignore_class
        picked = -logp.gather(-1, torch.where(keep, y_true, 0).unsqueeze(-1)).squeeze(-1)
        return picked * keep
    return -logp.gather(-1, y_true.unsqueeze(-1)).squeeze(-1)


def huber(y_pred, y_true, delta: float = 1.0):
    err = (y_pred - align_targets(y_pred, y_true)).abs()
    quad = err.clamp_max(delta)
    return (0.5 * quad.square() + delta * (err - quad)).mean(dim=-1)


def kl_divergence(y_pred, y_true):
    y_true = align_targets(y_pred, y_true).clamp(EPSILON, 1.0)
    y_pred = y_pred.clamp(EPSILON, 1.0)
    return (y_true * torch.log(y_true / y_pred)).sum(dim=-1)


def poisson(y_pred, y_true):
    y_true = align_targets(y_pred, y_true)
    return (y_pred - y_true * torch.log(y_pred + EPSILON)).mean(dim=-1)


def _signed(y_true):
    """Keras' hinge losses take 0/1 labels as -1/+1."""
    is_binary = ((y_true == 0) | (y_true == 1)).all()
    return torch.where(is_binary, 2.0 * y_true - 1.0, y_true)


def hinge(y_pred, y_true):
    y_true = _signed(align_targets(y_pred, y_true))
    return (1.0 - y_true * y_pred).clamp_min(0.0).mean(dim=-1)


def squared_hinge(y_pred, y_true):
    y_true = _signed(align_targets(y_pred, y_true))
    return (1.0 - y_true * y_pred).clamp_min(0.0).square().mean(dim=-1)


def categorical_hinge(y_pred, y_true):
    y_true = align_targets(y_pred, y_true)
    pos = (y_true * y_pred).sum(dim=-1)
    neg = ((1.0 - y_true) * y_pred).amax(dim=-1)
    return (neg - pos + 1.0).clamp_min(0.0)


def cosine_similarity(y_pred, y_true):
    y_true = align_targets(y_pred, y_true)
    return -(F.normalize(y_true, dim=-1) * F.normalize(y_pred, dim=-1)).sum(dim=-1)


def log_cosh(y_pred, y_true):
    x = y_pred - align_targets(y_pred, y_true)
    return (x + F.softplus(-2.0 * x) - torch.log(torch.tensor(2.0, dtype=x.dtype, device=x.device))).mean(dim=-1)


class _Configured:
    """A Keras loss class: a loss function with its options bound (``from_logits`` etc.)."""

    fn: Callable = staticmethod(mean_squared_error)

    def __init__(self, **options: Any):
        self.options = options
        self.__name__ = self.fn.__name__

    def __call__(self, y_pred, y_true):
        return type(self).fn(y_pred, y_true, **self.options)

    @property
    def from_logits(self) -> bool:
        return bool(self.options.get("from_logits", False))


class BinaryCrossentropy(_Configured):
    fn = staticmethod(binary_crossentropy)


class CategoricalCrossentropy(_Configured):
    fn = staticmethod(categorical_crossentropy)


class SparseCategoricalCrossentropy(_Configured):
    fn = staticmethod(sparse_categorical_crossentropy)

    @property
    def summing(self) -> bool | None:
        return True if self.from_logits and self.options.get("ignore_class") is None else None

    def summed(self, y_pred, y_true) -> tuple[torch.Tensor, int]:
        if y_true.dim() == y_pred.dim() and y_true.shape[-1] == 1:
            y_true = y_true.squeeze(-1)
        logits = y_pred.movedim(-1, 1) if y_pred.dim() > 2 else y_pred
        return F.cross_entropy(logits, y_true.long(), reduction="sum"), math.prod(y_pred.shape[1:-1])


class Huber(_Configured):
    fn = staticmethod(huber)


_BY_NAME: dict[str, Callable] = {
    "mean_squared_error": mean_squared_error, "mse": mean_squared_error,
    "mean_absolute_error": mean_absolute_error, "mae": mean_absolute_error,
    "mean_absolute_percentage_error": mean_absolute_percentage_error, "mape": mean_absolute_percentage_error,
    "mean_squared_logarithmic_error": mean_squared_logarithmic_error, "msle": mean_squared_logarithmic_error,
    "binary_crossentropy": binary_crossentropy, "bce": binary_crossentropy,
    "categorical_crossentropy": categorical_crossentropy,
    "sparse_categorical_crossentropy": sparse_categorical_crossentropy,
    "huber": huber, "huber_loss": huber,
    "kl_divergence": kl_divergence, "kld": kl_divergence, "kullback_leibler_divergence": kl_divergence,
    "poisson": poisson, "hinge": hinge, "squared_hinge": squared_hinge, "categorical_hinge": categorical_hinge,
    "cosine_similarity": cosine_similarity, "log_cosh": log_cosh, "logcosh": log_cosh,
}


_ELEMENTWISE = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss,
                nn.KLDivLoss, nn.PoissonNLLLoss, nn.SoftMarginLoss)
_CLASS_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)


class _TorchLossModule:
    """A torch loss module (``nn.CrossEntropyLoss()``, ...) made to return per-element values.

    For the common modules it also offers ``summed``: the batch sum in one fused kernel (reduction="sum"),
    which the unweighted hot path uses instead of per-element values and a separate sum.
    """

    def __init__(self, module: nn.Module):
        self.module = copy.copy(module)
        if hasattr(self.module, "reduction"):
            self.module.reduction = "none"
        self.summing = None
        self.by_class = isinstance(module, _CLASS_LOSSES)
        if isinstance(module, _ELEMENTWISE + _CLASS_LOSSES):
            self.summing = copy.copy(module)
            self.summing.reduction = "sum"
        self.__name__ = type(module).__name__

    def _prepare(self, y_pred, y_true):
        if self.by_class:
            if y_true.dim() == y_pred.dim() and y_true.shape[-1] == 1 and not y_true.is_floating_point():
                y_true = y_true.squeeze(-1)
            if y_pred.dim() > 2 and not y_true.is_floating_point():  # (b, T, C): torch wants classes on dim 1
                y_pred = y_pred.movedim(-1, 1)
        elif y_pred.is_floating_point():
            y_true = align_targets(y_pred, y_true)
        return y_pred, y_true

    def __call__(self, y_pred, y_true):
        return self.module(*self._prepare(y_pred, y_true))

    def summed(self, y_pred, y_true) -> tuple[torch.Tensor, int]:
        """(sum of all per-element losses, elements per sample); per-sample loss sum = first / second."""
        y_pred, y_true = self._prepare(y_pred, y_true)
        per_sample = y_pred.shape[2:] if self.by_class else y_pred.shape[1:]
        return self.summing(y_pred, y_true), math.prod(per_sample)


def get(identifier: Any) -> Callable:
    """A loss function from a Keras name, a torch loss module, or a callable ``(y_pred, y_true)``."""
    if isinstance(identifier, str):
        key = identifier.lower()
        if key not in _BY_NAME:
            known = ", ".join(sorted(_BY_NAME))
            raise ValueError(f"Unknown loss {identifier!r}. Known names: {known}")
        return _BY_NAME[key]
    if isinstance(identifier, nn.Module):
        return _TorchLossModule(identifier)
    if callable(identifier):
        return identifier
    raise TypeError(f"loss must be a name, a torch loss module or a callable; got {type(identifier).__name__}")


def takes_logits(fn: Callable) -> bool:
    """Whether predictions are logits for this loss (decides thresholds of 'accuracy')."""
    if isinstance(fn, _Configured):
        return fn.from_logits
    if isinstance(fn, _TorchLossModule):
        return isinstance(fn.module, (nn.BCEWithLogitsLoss, nn.CrossEntropyLoss))
    return False


def _per_output(spec: Any, names: Sequence[str], what: str, default: Any) -> list[Any]:
    """Spread a single value, a list (by position) or a dict (by output name) over the outputs."""
    if isinstance(spec, Mapping):
        unknown = set(spec) - set(names)
        if unknown:
            raise ValueError(f"{what} names unknown outputs {sorted(unknown)}; outputs are {list(names)}")
        return [spec.get(name, default) for name in names]
    if isinstance(spec, (list, tuple)):
        if len(spec) != len(names):
            raise ValueError(f"{what} has {len(spec)} entries but the model has {len(names)} outputs")
        return list(spec)
    return [spec] * len(names)


class CompiledLoss:
    """The compiled loss of a model: per-output functions, loss weights and the global normalisation."""

    def __init__(self, loss: Any, loss_weights: Any, output_names: Sequence[str]):
        self.output_names = list(output_names)
        specs = _per_output(loss, self.output_names, "loss", None)
        if any(s is None for s in specs):
            missing = [n for n, s in zip(self.output_names, specs) if s is None]
            raise ValueError(f"no loss given for outputs {missing}")
        self.fns = [get(s) for s in specs]
        weights = _per_output(loss_weights, self.output_names, "loss_weights", 1.0) if loss_weights is not None \
            else [1.0] * len(self.output_names)
        self.weights = [float(w) for w in weights]
        self.fused = [getattr(fn, "summing", None) is not None for fn in self.fns]

    def __call__(self, y_preds: list[torch.Tensor], y_trues: list[torch.Tensor],
                 sample_weight: torch.Tensor | None, size: int, global_size: int, world: int) -> "LocalLoss":
        """This rank's loss of one global batch.

        What to backpropagate is ``value * scale``: the rank's summed (weighted) sample losses times
        ``world / global_size``, so that DDP's gradient average is the gradient of
        ``sum over the global batch / global_size``. ``parts`` are (value, factor) pairs whose products are
        the rank's summed losses for the logs: the total first, then each output's when there are several.
        """
        scale = world / global_size
        if len(self.fns) == 1:
            value, factor = self._summed(0, y_preds[0], y_trues[0], sample_weight, size)
            factor *= self.weights[0]
            return LocalLoss(value, factor * scale, [(value, factor)])
        parts = [self._summed(i, y_preds[i], y_trues[i], sample_weight, size) for i in range(len(self.fns))]
        total = sum(value * (w * factor) for (value, factor), w in zip(parts, self.weights))
        return LocalLoss(total, scale, [(total, 1.0)] + parts)

    def _summed(self, i: int, y_pred: torch.Tensor, y_true: torch.Tensor, sample_weight: torch.Tensor | None,
                size: int) -> tuple[torch.Tensor, float]:
        """(value, factor): value * factor is the sum over this rank's samples of the per-sample loss."""
        fn = self.fns[i]
        if sample_weight is None and self.fused[i]:
            value, per_sample = fn.summed(y_pred, y_true)
            return value, 1.0 / per_sample
        values = fn(y_pred, y_true)
        if values.dim() == 0:  # a callable that already averaged over the batch
            if sample_weight is not None:
                raise ValueError(
                    f"loss {getattr(fn, '__name__', fn)!r} returned a scalar, so sample weights cannot "
                    "be applied; return one value per sample instead"
                )
            if size == 0:  # the mean of no samples is NaN: contribute a zero that still reaches every output
                return y_pred.sum() * 0.0, 1.0
            return values, float(size)
        if sample_weight is not None:
            w = sample_weight
            while w.dim() < values.dim():
                w = w.unsqueeze(-1)
            values = values * w.to(values.dtype)
        if values.dim() > 1:
            values = values.flatten(1).mean(dim=1)
        return values.sum(), 1.0


class LocalLoss(NamedTuple):
    value: torch.Tensor   # backpropagate value * scale (the scale can seed backward instead of a multiply)
    scale: float
    parts: list[tuple[torch.Tensor, float]]

    @property
    def objective(self) -> torch.Tensor:
        return self.value * self.scale
