"""Optimizers by Keras name, with Keras' default hyper-parameters, or given as torch objects."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

# Keras' defaults, expressed in torch's argument names.
_KERAS_DEFAULTS: dict[str, tuple[type, dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.01}),
    "adam": (torch.optim.Adam, {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-7}),
    "adamw": (torch.optim.AdamW, {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-7, "weight_decay": 0.004}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.001, "alpha": 0.9, "eps": 1e-7}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.001, "initial_accumulator_value": 0.1, "eps": 1e-7}),
    "adadelta": (torch.optim.Adadelta, {"lr": 0.001, "rho": 0.95, "eps": 1e-7}),
    "adamax": (torch.optim.Adamax, {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-7}),
    "nadam": (torch.optim.NAdam, {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-7}),
}


def names() -> list[str]:
    return sorted(_KERAS_DEFAULTS)


def check(identifier: Any) -> None:
    """Validate an optimizer argument without building anything (so errors come before any collective)."""
    if isinstance(identifier, str):
        if identifier.lower() not in _KERAS_DEFAULTS:
            raise ValueError(f"Unknown optimizer {identifier!r}. Known names: {', '.join(names())}")
    elif not (isinstance(identifier, torch.optim.Optimizer) or callable(identifier)):
        raise TypeError(
            "optimizer must be a Keras name, a torch.optim.Optimizer or a callable params -> Optimizer; "
            f"got {type(identifier).__name__}"
        )


def build(identifier: str | torch.optim.Optimizer | Callable, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The torch optimizer for ``identifier`` over ``params``."""
    check(identifier)
    if isinstance(identifier, str):
        cls, kwargs = _KERAS_DEFAULTS[identifier.lower()]
        return cls(params, **kwargs)
    if isinstance(identifier, torch.optim.Optimizer):
        return identifier
    opt = identifier(params)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"the optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer")
    return opt
