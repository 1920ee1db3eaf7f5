"""The Keras 3 metric object API: ``Metric`` with additive state variables, ``Mean``, ``Sum``, ``MeanMetricWrapper``.

Every state a metric registers with ``add_variable`` must be ADDITIVE: the state of the whole data is the
element-wise sum of the states of its parts (sums, counts, confusion-matrix counts; not means, maxima or
running averages). ``MetricSet`` sums each state over all ranks with one all-reduce per epoch and computes
``result()`` from the sums, which makes a metric built this way exact on any number of ranks.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch

__all__ = ["Variable", "Metric", "Mean", "Sum", "MeanMetricWrapper"]

STATE_DTYPE = torch.float64  # states default to float64: exact sums and counts up to 2**53


def snake_case(name: str) -> str:
    """Keras' snake case of a class name: "MeanAbsoluteError" -> "mean_absolute_error", "AUC" -> "auc"."""
    words = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", words).lower()


class Variable(torch.Tensor):
    """A metric state: a tensor with Keras' ``assign``/``assign_add``/``assign_sub`` and ``value``.

    Operations on it give plain tensors; the in-place methods keep the object, so attributes stay valid
    when ``MetricSet`` moves the state to the device.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    def assign(self, value: Any) -> "Variable":
        self.copy_(torch.as_tensor(value, device=self.device).to(self.dtype).expand_as(self))
        return self

    def assign_add(self, value: Any) -> "Variable":
        self.add_(torch.as_tensor(value, device=self.device).to(self.dtype))
        return self

    def assign_sub(self, value: Any) -> "Variable":
        self.sub_(torch.as_tensor(value, device=self.device).to(self.dtype))
        return self

    def __deepcopy__(self, memo: dict) -> "Variable":
        copied = self.value.detach().clone().as_subclass(Variable)
        memo[id(self)] = copied
        return copied

    @property
    def value(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor)

    def numpy(self, *args, **kwargs):  # noqa: D102 - as a plain tensor
        return self.value.detach().cpu().numpy(*args, **kwargs)


def _initial(shape: tuple[int, ...], initializer: Any, dtype: torch.dtype) -> torch.Tensor:
    if callable(initializer):
        return torch.as_tensor(initializer(shape, dtype=dtype), dtype=dtype).reshape(shape)
    if initializer in ("zeros", "Zeros", None):
        return torch.zeros(shape, dtype=dtype)
    if initializer in ("ones", "Ones"):
        return torch.ones(shape, dtype=dtype)
    if isinstance(initializer, (int, float)):
        return torch.full(shape, float(initializer), dtype=dtype)
    raise ValueError(f"initializer must be 'zeros', 'ones', a number or a callable; got {initializer!r}")


class Metric:
    """Base class of metrics, as Keras 3's ``keras.metrics.Metric``.

    Subclasses create their states in ``__init__`` with ``self.add_variable(shape, initializer, dtype, name)``,
    implement ``update_state(y_true, y_pred, sample_weight=None)`` (update the states in place: ``assign_add``
    or ``+=``) and ``result()``. The states must add up across ranks (sums and counts): ``fit`` sums them over
    all ranks at the end of an epoch, then calls ``result()``. ``reset_state()`` zeroes every state by default.
    """

    def __init__(self, name: str | None = None, dtype: Any = None):
        self.name = name or snake_case(type(self).__name__)
        self.dtype = dtype
        self._variables: list[Variable] = []
        self._variable_names: list[str] = []
        self._initial: list[torch.Tensor] = []

    def add_variable(self, shape: Any = (), initializer: Any = "zeros", dtype: Any = None,
                     name: str | None = None) -> Variable:
        """Register an ADDITIVE state tensor (float64 unless ``dtype`` says otherwise) and return it."""
        if "_variables" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() before add_variable")
        shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in (shape or ()))
        dtype = _torch_dtype(dtype) or _torch_dtype(self.dtype) or STATE_DTYPE
        start = _initial(shape, initializer, dtype)
        variable = start.clone().as_subclass(Variable)
        self._variables.append(variable)
        self._variable_names.append(name or f"variable_{len(self._variables) - 1}")
        self._initial.append(start)
        return variable

    add_weight = add_variable

    @property
    def variables(self) -> list[Variable]:
        return list(self._variables)

    def update_state(self, y_true, y_pred, sample_weight=None) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement update_state(y_true, y_pred, sample_weight)")

    def result(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement result()")

    def reset_state(self) -> None:
        """Every state back to its initial value (zeros by default)."""
        with torch.no_grad():
            for v, start in zip(self._variables, self._initial):
                v.copy_(start.to(v.device))

    def __call__(self, y_true, y_pred, sample_weight=None):
        """Update with one batch and return the result so far (as Keras' ``metric(y_true, y_pred)``)."""
        self.update_state(y_true, y_pred, sample_weight=sample_weight)
        return self.result()

    def to(self, device: torch.device) -> "Metric":
        """Move every state to ``device`` in place (the attribute holding a state stays valid)."""
        with torch.no_grad():
            for v in self._variables:
                if v.device != device:
                    v.data = v.data.to(device)
        return self

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Metric":
        return cls(**config)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name}>"


def _torch_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"unknown dtype {dtype!r}")


def as_tensor(x: Any, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(x, device=None if like is None else like.device)


def per_sample(values: torch.Tensor, sample_weight: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Values reduced to one per sample (mean over trailing axes the weights do not have), and the weights."""
    if sample_weight is None:
        return values, None
    w = as_tensor(sample_weight, values).to(values.dtype)
    while w.dim() > values.dim() and w.shape[-1] == 1:
        w = w.squeeze(-1)
    while values.dim() > max(w.dim(), 1):
        values = values.mean(dim=-1)
    return values, w.reshape(w.shape + (1,) * (values.dim() - w.dim())).expand_as(values)


class Mean(Metric):
    """The (weighted) mean of the values given to ``update_state(values, sample_weight=None)``."""

    def __init__(self, name: str = "mean", dtype: Any = None):
        super().__init__(name=name, dtype=dtype)
        self.total = self.add_variable(name="total")
        self.count = self.add_variable(name="count")

    def update_state(self, values, sample_weight=None) -> None:
        values = as_tensor(values)
        values, w = per_sample(values, sample_weight)
        if w is None:
            self.total.add_(values.sum().to(self.total.dtype))
            self.count.add_(values.numel())
        else:
            self.total.add_((values * w).sum().to(self.total.dtype))
            self.count.add_(w.sum().to(self.count.dtype))

    def result(self) -> torch.Tensor:
        return torch.where(self.count != 0, self.total.value / self.count.value, 0.0)


class Sum(Metric):
    """The (weighted) sum of the values given to ``update_state(values, sample_weight=None)``."""

    def __init__(self, name: str = "sum", dtype: Any = None):
        super().__init__(name=name, dtype=dtype)
        self.total = self.add_variable(name="total")

    def update_state(self, values, sample_weight=None) -> None:
        values = as_tensor(values)
        values, w = per_sample(values, sample_weight)
        if w is not None:
            values = values * w
        self.total.add_(values.sum().to(self.total.dtype))

    def result(self) -> torch.Tensor:
        return self.total.value.clone()


class MeanMetricWrapper(Mean):
    """The mean over samples of ``fn(y_true, y_pred, **kwargs)`` (per-sample values)."""

    def __init__(self, fn: Callable, name: str | None = None, dtype: Any = None, **kwargs: Any):
        super().__init__(name=name or getattr(fn, "__name__", snake_case(type(fn).__name__)), dtype=dtype)
        self._fn, self._fn_kwargs = fn, kwargs

    def update_state(self, y_true, y_pred, sample_weight=None) -> None:
        y_pred = as_tensor(y_pred)
        y_true = as_tensor(y_true, y_pred)
        values = self._fn(y_true, y_pred, **self._fn_kwargs)
        if values.dim() == 0:
            values = values.reshape(1)
        super().update_state(values, sample_weight)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), **self._fn_kwargs}
