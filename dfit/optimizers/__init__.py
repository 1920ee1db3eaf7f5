"""Optimizers for ``model.compile(optimizer=...)``.

- A Keras name (``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"``, ``"adagrad"``, ``"adadelta"``, ``"adamax"``,
  ``"nadam"``; any case) builds that Keras optimizer with Keras 3's defaults.
- A Keras optimizer object, made without parameters as in Keras: ``dfit.optimizers.Adam(learning_rate=1e-3)``,
  ``SGD``, ``AdamW``, ``RMSprop``, ``Adagrad``, ``Adadelta``, ``Adamax``, ``Nadam``; compile binds it to the
  module's parameters. These follow Keras 3's update rules exactly and are ``torch.optim.Optimizer`` objects.
  ``learning_rate`` may be a schedule from ``dfit.optimizers.schedules`` or any callable of the step.
- A ``torch.optim.Optimizer`` instance (used as it is) or a callable ``params -> Optimizer``: torch's rules.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from . import schedules
from .base import KerasOptimizer
from .rules import SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, Nadam, RMSprop

__all__ = ["check", "build", "names", "serialize", "deserialize", "schedules", "KerasOptimizer", "SGD", "Adam",
           "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax", "Nadam"]

_BY_NAME: dict[str, type[KerasOptimizer]] = {
    "sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop, "adagrad": Adagrad, "adadelta": Adadelta,
    "adamax": Adamax, "nadam": Nadam,
}


def names() -> list[str]:
    """The Keras optimizer names ``compile`` accepts."""
    return sorted(_BY_NAME)


def check(identifier: Any) -> None:
    """Validate an optimizer argument without building anything (so errors come before any collective)."""
    if isinstance(identifier, str):
        if identifier.lower() not in _BY_NAME:
            raise ValueError(f"Unknown optimizer {identifier!r}. Known names: {', '.join(names())}")
    elif not (isinstance(identifier, torch.optim.Optimizer) or callable(identifier)):
        raise TypeError(
            "optimizer must be a Keras name, a dfit.optimizers object (e.g. dfit.optimizers.Adam()), "
            "a torch.optim.Optimizer or a callable params -> Optimizer; "
            f"got {type(identifier).__name__}"
        )


def build(identifier: str | torch.optim.Optimizer | Callable, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The torch optimizer for ``identifier`` over ``params``.

    A Keras optimizer object is bound to ``params`` and returned (the same object; compiling the same model
    again keeps it and its state, another model's parameters raise ValueError)."""
    check(identifier)
    if isinstance(identifier, str):
        return _BY_NAME[identifier.lower()]().bind(params)
    if isinstance(identifier, type) and issubclass(identifier, KerasOptimizer):
        return identifier().bind(params)
    if isinstance(identifier, KerasOptimizer):
        params = list(params)
        if identifier.bound and _same_tensors(identifier._parameters(), params):
            return identifier
        return identifier.bind(params)
    if isinstance(identifier, torch.optim.Optimizer):
        return identifier
    opt = identifier(params)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"the optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer")
    return opt


def _same_tensors(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def serialize(optimizer: Any) -> dict[str, Any] | None:
    """A Keras optimizer's class and config as plain data (its schedule too), for ``Model.save``; None for a torch
    optimizer or a custom schedule, which cannot be rebuilt from data."""
    if not isinstance(optimizer, KerasOptimizer) or type(optimizer) not in _BY_NAME.values():
        return None
    config = dict(optimizer.get_config())
    rate = config["learning_rate"]
    if isinstance(rate, schedules.LearningRateSchedule):
        if type(rate).__name__ not in schedules.__all__:
            return None
        config["learning_rate"] = {"class_name": type(rate).__name__, "config": rate.get_config()}
    elif not isinstance(rate, (int, float)):
        return None
    return {"class_name": type(optimizer).__name__, "config": config}


def deserialize(entry: dict[str, Any]) -> KerasOptimizer:
    """The (unbound) optimizer ``serialize`` described."""
    classes = {cls.__name__: cls for cls in _BY_NAME.values()}
    if entry.get("class_name") not in classes:
        raise ValueError(f"Unknown optimizer class {entry.get('class_name')!r}; known: {', '.join(sorted(classes))}")
    config = dict(entry["config"])
    rate = config.get("learning_rate")
    if isinstance(rate, dict):
        name = rate.get("class_name")
        if name not in schedules.__all__ or name == "LearningRateSchedule":
            raise ValueError(f"Unknown learning-rate schedule {name!r}")
        config["learning_rate"] = getattr(schedules, name).from_config(rate["config"])
    return classes[entry["class_name"]].from_config(config)
