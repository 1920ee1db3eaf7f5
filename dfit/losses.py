"""Keras-named losses, and the weighting and global-batch normalisation every loss goes through.

A loss function here returns per-sample values: shape (batch,) or (batch, timesteps), the last axis of
the targets already reduced (the Keras convention). ``CompiledLoss`` weights them and normalises by the
GLOBAL batch, so DDP's averaged gradient equals the single-process gradient of the same global batch.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

EPSILON = 1e-7

__all__ = [
    "Loss", "LossFunctionWrapper", "from_torch", "keras_order", "MeanSquaredError", "MeanAbsoluteError",
    "MeanAbsolutePercentageError", "MeanSquaredLogarithmicError", "CategoricalHinge", "Hinge", "SquaredHinge",
    "KLDivergence", "Poisson", "LogCosh", "CosineSimilarity", "ModelComputedLoss",
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


def mean_squared_error(y_true, y_pred):
    return (y_pred - align_targets(y_pred, y_true)).square().mean(dim=-1)


def mean_absolute_error(y_true, y_pred):
    return (y_pred - align_targets(y_pred, y_true)).abs().mean(dim=-1)


def mean_absolute_percentage_error(y_true, y_pred):
    y_true = align_targets(y_pred, y_true)
    return 100.0 * ((y_true - y_pred) / y_true.abs().clamp_min(EPSILON)).abs().mean(dim=-1)


def mean_squared_logarithmic_error(y_true, y_pred):
    y_true = align_targets(y_pred, y_true)
    first = torch.log1p(y_pred.clamp_min(EPSILON))
    second = torch.log1p(y_true.clamp_min(EPSILON))
    return (first - second).square().mean(dim=-1)


def binary_crossentropy(y_true, y_pred, from_logits: bool = False, label_smoothing: float = 0.0):
    y_true = align_targets(y_pred, y_true)
    if label_smoothing:
        y_true = y_true * (1.0 - label_smoothing) + 0.5 * label_smoothing
    if from_logits:
        return F.binary_cross_entropy_with_logits(y_pred, y_true, reduction="none").mean(dim=-1)
    p = y_pred.clamp(EPSILON, 1.0 - EPSILON)
    return -(y_true * torch.log(p) + (1.0 - y_true) * torch.log1p(-p)).mean(dim=-1)


def categorical_crossentropy(y_true, y_pred, from_logits: bool = False, label_smoothing: float = 0.0):
    y_true = align_targets(y_pred, y_true)
    if label_smoothing:
        y_true = y_true * (1.0 - label_smoothing) + label_smoothing / y_pred.shape[-1]
    if from_logits:
        return -(y_true * F.log_softmax(y_pred, dim=-1)).sum(dim=-1)
    p = (y_pred / y_pred.sum(dim=-1, keepdim=True)).clamp(EPSILON, 1.0 - EPSILON)
    return -(y_true * torch.log(p)).sum(dim=-1)


def sparse_categorical_crossentropy(y_true, y_pred, from_logits: bool = False, ignore_class: int | None = None):
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


def huber(y_true, y_pred, delta: float = 1.0):
    err = (y_pred - align_targets(y_pred, y_true)).abs()
    quad = err.clamp_max(delta)
    return (0.5 * quad.square() + delta * (err - quad)).mean(dim=-1)


def kl_divergence(y_true, y_pred):
    y_true = align_targets(y_pred, y_true).clamp(EPSILON, 1.0)
    y_pred = y_pred.clamp(EPSILON, 1.0)
    return (y_true * torch.log(y_true / y_pred)).sum(dim=-1)


def poisson(y_true, y_pred):
    y_true = align_targets(y_pred, y_true)
    return (y_pred - y_true * torch.log(y_pred + EPSILON)).mean(dim=-1)


_GLOBAL_DECISIONS: contextvars.ContextVar[bool] = contextvars.ContextVar("dfit_global_decisions", default=False)


@contextlib.contextmanager
def global_batch_decisions(active: bool = True):
    """Inside, a loss that decides something from the data (hinge: "are the labels 0/1?") decides it over the
    GLOBAL batch, all ranks together, so N ranks decide as one would. The engine enters this around its loops
    on N ranks; every rank runs every step there, so the small all-reduce cannot hang."""
    token = _GLOBAL_DECISIONS.set(active)
    try:
        yield
    finally:
        _GLOBAL_DECISIONS.reset(token)


def _signed(y_true):
    """Keras' hinge losses take a batch of 0/1 labels as -1/+1 (decided over the whole global batch)."""
    not_binary = (~((y_true == 0) | (y_true == 1))).any()
    if _GLOBAL_DECISIONS.get():
        from . import distributed

        not_binary = distributed.all_reduce_max(not_binary.to(torch.float32).reshape(1))[0] > 0
    return torch.where(not_binary, y_true, 2.0 * y_true - 1.0)


def hinge(y_true, y_pred):
    y_true = _signed(align_targets(y_pred, y_true))
    return (1.0 - y_true * y_pred).clamp_min(0.0).mean(dim=-1)


def squared_hinge(y_true, y_pred):
    y_true = _signed(align_targets(y_pred, y_true))
    return (1.0 - y_true * y_pred).clamp_min(0.0).square().mean(dim=-1)


def categorical_hinge(y_true, y_pred):
    y_true = align_targets(y_pred, y_true)
    pos = (y_true * y_pred).sum(dim=-1)
    neg = ((1.0 - y_true) * y_pred).amax(dim=-1)
    return (neg - pos + 1.0).clamp_min(0.0)


def _l2_normalize(x):
    """``x / max(||x||, 1e-7)`` over the last axis: Keras' ``x * min(rsqrt(sum(x**2)), 1 / epsilon())`` with its
    epsilon 1e-7 (a vector shorter than 1e-7 is scaled by 1e7, not to unit length), whose gradient at the zero
    vector is finite (1e7; Keras' autograd gives NaN there)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-7)


def cosine_similarity(y_true, y_pred):
    y_true = align_targets(y_pred, y_true)
    return -(_l2_normalize(y_true) * _l2_normalize(y_pred)).sum(dim=-1)


def log_cosh(y_true, y_pred):
    x = y_pred - align_targets(y_pred, y_true)
    return (x + F.softplus(-2.0 * x) - torch.log(torch.tensor(2.0, dtype=x.dtype, device=x.device))).mean(dim=-1)


# -- Keras' loss objects ------------------------------------------------------------------------------------
REDUCTIONS = ("sum_over_batch_size", "mean", "sum")


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _check_reduction(reduction: Any) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {list(REDUCTIONS)} for a loss used in training; got {reduction!r} "
            "('none' returns unreduced values, which fit cannot train on; 'mean_with_sample_weight' is not supported)"
        )
    return reduction


class Loss:
    """Base class of Keras-style losses. Subclasses implement ``call(y_true, y_pred)`` and return one value per
    sample (the last axis reduced). Calling the object reduces like Keras: ``loss(y_true, y_pred, sample_weight)``.
    """

    def __init__(self, name: str | None = None, reduction: str = "sum_over_batch_size", dtype: Any = None):
        self.name = name or _snake(type(self).__name__)
        self.reduction = _check_reduction(reduction)
        self.dtype = dtype

    @property
    def __name__(self) -> str:  # noqa: D401 - read by code that names losses like functions
        return self.name

    def call(self, y_true, y_pred):
        raise NotImplementedError(f"{type(self).__name__} must implement call(y_true, y_pred)")

    def __call__(self, y_true, y_pred, sample_weight=None):
        values = self.call(y_true, y_pred)
        if sample_weight is not None:
            w = torch.as_tensor(sample_weight, dtype=values.dtype, device=values.device)
            while w.dim() < values.dim():
                w = w.unsqueeze(-1)
            values = values * w
        total = values.sum()
        return total if self.reduction == "sum" else total / max(values.numel(), 1)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "reduction": self.reduction}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Loss":
        return cls(**config)


class LossFunctionWrapper(Loss):
    """A loss function ``fn(y_true, y_pred, **options)`` as a ``Loss`` object."""

    def __init__(self, fn: Callable, reduction: str = "sum_over_batch_size", name: str | None = None,
                 **options: Any):
        super().__init__(name=name or getattr(fn, "__name__", None), reduction=reduction)
        self.fn, self.options = fn, options

    @property
    def from_logits(self) -> bool:
        return bool(self.options.get("from_logits", False))

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred, **self.options)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), **self.options}


def _wrapper(class_name: str, fn: Callable, doc: str, **defaults: Any) -> type:
    """A Keras loss class over ``fn`` whose constructor takes ``defaults``' options, then reduction and name."""

    def __init__(self, reduction="sum_over_batch_size", name=fn.__name__, **options):
        unknown = set(options) - set(defaults)
        if unknown:
            raise TypeError(f"{class_name}() got unexpected arguments {sorted(unknown)}; "
                            f"it takes {sorted(defaults) + ['reduction', 'name']}")
        LossFunctionWrapper.__init__(self, fn, reduction=reduction, name=name, **{**defaults, **options})

    return type(class_name, (LossFunctionWrapper,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


MeanSquaredError = _wrapper("MeanSquaredError", mean_squared_error, "Mean of squared errors over the last axis.")
MeanAbsoluteError = _wrapper("MeanAbsoluteError", mean_absolute_error, "Mean of absolute errors.")
MeanAbsolutePercentageError = _wrapper("MeanAbsolutePercentageError", mean_absolute_percentage_error,
                                       "100 * mean(|y_true - y_pred| / |y_true|).")
MeanSquaredLogarithmicError = _wrapper("MeanSquaredLogarithmicError", mean_squared_logarithmic_error,
                                       "Mean of squared differences of log(1 + y).")
BinaryCrossentropy = _wrapper("BinaryCrossentropy", binary_crossentropy,
                              "Binary cross-entropy of probabilities (or logits with from_logits=True).",
                              from_logits=False, label_smoothing=0.0)
CategoricalCrossentropy = _wrapper("CategoricalCrossentropy", categorical_crossentropy,
                                   "Cross-entropy against one-hot (or soft) targets.",
                                   from_logits=False, label_smoothing=0.0)
SparseCategoricalCrossentropy = _wrapper("SparseCategoricalCrossentropy", sparse_categorical_crossentropy,
                                         "Cross-entropy against integer class labels.",
                                         from_logits=False, ignore_class=None)
Huber = _wrapper("Huber", huber, "Quadratic below delta, linear above.", delta=1.0)
LogCosh = _wrapper("LogCosh", log_cosh, "Mean of log(cosh(error)).")
KLDivergence = _wrapper("KLDivergence", kl_divergence, "Kullback-Leibler divergence of y_pred from y_true.")
Poisson = _wrapper("Poisson", poisson, "Mean of y_pred - y_true * log(y_pred).")
Hinge = _wrapper("Hinge", hinge, "Mean of max(1 - y_true * y_pred, 0); 0/1 labels are taken as -1/1.")
SquaredHinge = _wrapper("SquaredHinge", squared_hinge, "Mean of max(1 - y_true * y_pred, 0)^2.")
CategoricalHinge = _wrapper("CategoricalHinge", categorical_hinge, "max(neg - pos + 1, 0) over one-hot targets.")
CosineSimilarity = _wrapper("CosineSimilarity", cosine_similarity, "Minus the cosine similarity (a loss).")


# -- which argument order each kind of loss takes ---------------------------------------------------------------
# One rule, documented in docs/losses-and-metrics.md:
#   Keras name ("mse")                        -> dfit's implementation, (y_true, y_pred)
#   dfit.losses.Loss object or subclass       -> loss.call(y_true, y_pred)
#   torch.nn loss module (nn.MSELoss())       -> module(input=y_pred, target=y_true)   (torch's order)
#   function of torch.nn.functional (F.mse_loss), or dfit.losses.from_torch(fn)
#                                             -> fn(y_pred, y_true, reduction="none")   (torch's order)
#   any other callable                        -> fn(y_true, y_pred)                    (Keras' order)
class from_torch:  # noqa: N801 - reads as a function: loss=dfit.losses.from_torch(my_loss)
    """Mark a function written in torch's order ``fn(input, target, reduction=...)`` so dfit calls it that way."""

    def __init__(self, fn: Callable, reduction_argument: bool = True):
        if not callable(fn):
            raise TypeError(f"from_torch() needs a function; got {type(fn).__name__}")
        self.fn, self.reduction_argument = fn, reduction_argument
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, y_true, y_pred):
        y_pred, y_true = _torch_order_inputs(y_pred, y_true, by_class=_is_class_loss(self.fn))
        if self.reduction_argument:
            return self.fn(y_pred, y_true, reduction="none")
        return self.fn(y_pred, y_true)


def is_torch_functional(fn: Any) -> bool:
    """A loss function of ``torch.nn.functional`` (they all take ``(input, target, ..., reduction=)``)."""
    return callable(fn) and getattr(fn, "__module__", None) == "torch.nn.functional"


_CLASS_FUNCTIONS = ("cross_entropy", "nll_loss", "multi_margin_loss")


def _is_class_loss(fn: Any) -> bool:
    return getattr(fn, "__name__", "") in _CLASS_FUNCTIONS


def _torch_order_inputs(y_pred, y_true, by_class: bool):
    """Shape targets as torch expects: class indices without a trailing axis of 1, classes on dim 1."""
    if by_class:
        if y_true.dim() == y_pred.dim() and y_true.shape[-1] == 1 and not y_true.is_floating_point():
            y_true = y_true.squeeze(-1)
        if y_pred.dim() > 2 and not y_true.is_floating_point():  # (b, T, C): torch wants classes on dim 1
            y_pred = y_pred.movedim(-1, 1)
    elif y_pred.is_floating_point():
        y_true = align_targets(y_pred, y_true)
    return y_pred, y_true


_ELEMENTWISE = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss,
                nn.KLDivLoss, nn.PoissonNLLLoss, nn.SoftMarginLoss)
_CLASS_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)


class _TorchLossModule:
    """A torch loss module (``nn.CrossEntropyLoss()``, ...) called in torch's order, per element.

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
        self.__name__ = _snake(type(module).__name__)

    def __call__(self, y_true, y_pred):
        return self.module(*_torch_order_inputs(y_pred, y_true, self.by_class))

    def summed(self, y_true, y_pred) -> tuple[torch.Tensor, int]:
        """(sum of all per-element losses, elements per sample); per-sample loss sum = first / second."""
        y_pred, y_true = _torch_order_inputs(y_pred, y_true, self.by_class)
        per_sample = y_pred.shape[2:] if self.by_class else y_pred.shape[1:]
        return self.summing(y_pred, y_true), math.prod(per_sample)


class _FusedSparseCrossentropy:
    """Sparse cross-entropy from logits as one fused ``reduction="sum"`` kernel (the unweighted hot path)."""

    def __init__(self, loss: LossFunctionWrapper):
        self.loss = loss
        self.__name__ = loss.name

    def __call__(self, y_true, y_pred):
        return self.loss.call(y_true, y_pred)

    def summed(self, y_true, y_pred) -> tuple[torch.Tensor, int]:
        if y_true.dim() == y_pred.dim() and y_true.shape[-1] == 1:
            y_true = y_true.squeeze(-1)
        logits = y_pred.movedim(-1, 1) if y_pred.dim() > 2 else y_pred
        return F.cross_entropy(logits, y_true.long(), reduction="sum"), math.prod(y_pred.shape[1:-1])

    summing = True


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


def keras_order(identifier: Any, what: str = "loss") -> Callable:
    """Any accepted loss (or metric function) as a callable ``(y_true, y_pred) -> per-sample values``,
    following the one rule above. A ``Loss`` object is returned as is (its ``call`` is Keras' order)."""
    if isinstance(identifier, str):
        key = identifier.lower()
        if key not in _BY_NAME:
            raise ValueError(f"Unknown {what} {identifier!r}. Known names: {', '.join(sorted(_BY_NAME))}")
        return _BY_NAME[key]
    if isinstance(identifier, type) and issubclass(identifier, (Loss, nn.Module)):
        raise TypeError(f"{what}={identifier.__name__} is a class; pass an instance: {identifier.__name__}()")
    if isinstance(identifier, Loss):
        return identifier
    if isinstance(identifier, nn.Module):
        return _TorchLossModule(identifier)
    if is_torch_functional(identifier):
        return from_torch(identifier)
    if callable(identifier):
        return identifier
    raise TypeError(f"{what} must be a Keras name, a dfit.losses.Loss, a torch loss module or a callable "
                    f"(y_true, y_pred); got {type(identifier).__name__}")


def get(identifier: Any) -> Callable:
    """The loss for ``identifier`` as a callable ``(y_true, y_pred) -> per-sample values`` (see ``keras_order``).

    A ``Loss`` object is called through its ``call``; its ``reduction`` is read by ``CompiledLoss``.
    """
    fn = keras_order(identifier)
    if isinstance(fn, Loss):
        if isinstance(fn, LossFunctionWrapper) and fn.fn is sparse_categorical_crossentropy and fn.from_logits \
                and fn.options.get("ignore_class") is None:
            return _FusedSparseCrossentropy(fn)
        return _LossCall(fn)
    return fn


class _LossCall:
    """A ``Loss`` object's ``call`` (per-sample values), keeping its name, reduction and from_logits."""

    summing = None

    def __init__(self, loss: Loss):
        self.loss = loss
        self.__name__ = loss.name

    def __call__(self, y_true, y_pred):
        return self.loss.call(y_true, y_pred)


def reduction_of(fn: Callable) -> str:
    loss = getattr(fn, "loss", None)
    return loss.reduction if isinstance(loss, Loss) else "sum_over_batch_size"


def _per_output(spec: Any, names: Sequence[str], what: str, default: Any) -> list[Any]:
    """Spread a single value, a list (by position) or a dict (by output name) over the outputs."""
    if isinstance(spec, Mapping):
        unknown = {k for k, v in spec.items() if v is not None} - set(names)
        if unknown:
            raise ValueError(f"{what} names outputs {sorted(unknown)} that have no targets in y; "
                             f"y gives targets for {list(names)}")
        return [spec.get(name, default) for name in names]
    if isinstance(spec, (list, tuple)):
        if len(spec) != len(names):
            shape = "a single array" if len(names) == 1 else f"{len(names)} outputs {list(names)}"
            raise ValueError(f"{what} has {len(spec)} entries, one per model output, but the targets y describe "
                             f"{shape}; pass y as a list (or dict) with one entry per output")
        return list(spec)
    return [spec] * len(names)


class CompiledLoss:
    """The compiled loss of a model: per-output functions (None: that output is not trained), loss weights,
    reductions and the global normalisation."""

    from_model = False

    def __init__(self, loss: Any, loss_weights: Any, output_names: Sequence[str]):
        self.output_names = list(output_names)
        specs = _per_output(loss, self.output_names, "loss", None)
        if all(s is None for s in specs):
            raise ValueError(f"no output has a loss: loss={loss!r} for outputs {self.output_names}")
        self.fns = [None if s is None else get(s) for s in specs]
        weights = _per_output(loss_weights, self.output_names, "loss_weights", 1.0) if loss_weights is not None \
            else [1.0] * len(self.output_names)
        self.weights = [float(w) for w in weights]
        self.trained = [i for i, fn in enumerate(self.fns) if fn is not None]
        self.fused = [getattr(fn, "summing", None) is not None for fn in self.fns]
        self.summed_over_batch = [fn is not None and reduction_of(fn) == "sum" for fn in self.fns]
        # Keras logs one loss per output only when several outputs have a loss
        self.logged_outputs = [self.output_names[i] for i in self.trained] if len(self.trained) > 1 else []

    def __call__(self, y_preds: list[torch.Tensor], y_trues: list[torch.Tensor],
                 sample_weight: torch.Tensor | None, size: int, global_size: int, world: int) -> "LocalLoss":
        """This rank's loss of one global batch.

        What to backpropagate is ``value * scale``: the rank's summed (weighted) sample losses times
        ``world / global_size``, so that DDP's gradient average is the gradient of
        ``sum over the global batch / global_size``. ``parts`` are (value, factor) pairs whose products are
        the rank's summed losses for the logs: the total first, then each output's when several are logged.
        """
        scale = world / global_size
        if len(self.trained) == 1:
            i = self.trained[0]
            value, factor = self._summed(i, y_preds[i], y_trues[i], sample_weight, size, global_size)
            factor *= self.weights[i]
            return LocalLoss(value, factor * scale, [(value, factor)])
        parts = [self._summed(i, y_preds[i], y_trues[i], sample_weight, size, global_size) for i in self.trained]
        total = sum(value * (self.weights[i] * factor) for (value, factor), i in zip(parts, self.trained))
        return LocalLoss(total, scale, [(total, 1.0)] + parts)

    def _summed(self, i: int, y_pred: torch.Tensor, y_true: torch.Tensor, sample_weight: torch.Tensor | None,
                size: int, global_size: int) -> tuple[torch.Tensor, float]:
        """(value, factor): value * factor is the sum over this rank's samples of the per-sample loss
        (times the global batch size for a loss whose reduction is "sum", as Keras logs it per sample)."""
        value, factor = self._sample_sum(i, y_pred, y_true, sample_weight, size)
        return value, factor * global_size if self.summed_over_batch[i] else factor

    def _sample_sum(self, i: int, y_pred: torch.Tensor, y_true: torch.Tensor, sample_weight: torch.Tensor | None,
                    size: int) -> tuple[torch.Tensor, float]:
        fn = self.fns[i]
        if sample_weight is None and self.fused[i]:
            value, per_sample = fn.summed(y_true, y_pred)
            return value, 1.0 / per_sample
        values = fn(y_true, y_pred)
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


class ModelComputedLoss:
    """``compile(loss=None)`` with a module that returns its own loss: a scalar mean over its batch, or a dict
    (or an object, e.g. a Hugging Face ``ModelOutput``) with a ``loss`` entry. Weighted by rows, so N ranks
    train on the same objective as one: the global batch's mean."""

    from_model = True
    logged_outputs: list[str] = []
    output_names: list[str] = []

    @staticmethod
    def extract(output: Any) -> torch.Tensor:
        if isinstance(output, torch.Tensor):
            loss = output
        elif isinstance(output, Mapping) and "loss" in output:
            loss = output["loss"]
        elif getattr(output, "loss", None) is not None:
            loss = output.loss
        else:
            raise ValueError(
                "compile() was given no loss, so the model must compute its own: its forward must return a scalar "
                f"loss, or a dict/object with a 'loss' entry; it returned {type(output).__name__}. "
                "Pass loss=... to compile() otherwise"
            )
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"the model's own loss must be a scalar tensor (the mean over its batch); got {shape}")
        return loss

    def __call__(self, output: Any, size: int, global_size: int, world: int) -> "LocalLoss":
        loss = self.extract(output)
        if size == 0:  # the mean of no rows is NaN; this rank adds nothing (its gradient is still all zeros)
            loss = torch.nan_to_num(loss, nan=0.0) * 0.0
        return LocalLoss(loss, world * size / global_size, [(loss, float(size))])


class LocalLoss(NamedTuple):
    value: torch.Tensor   # backpropagate value * scale (the scale can seed backward instead of a multiply)
    scale: float
    parts: list[tuple[torch.Tensor, float]]

    @property
    def objective(self) -> torch.Tensor:
        return self.value * self.scale
