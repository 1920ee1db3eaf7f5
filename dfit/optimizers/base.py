"""``KerasOptimizer``: a ``torch.optim.Optimizer`` whose ``step()`` follows Keras 3's update rules.

An object is made without parameters, as in Keras (``Adam(learning_rate=1e-3)``), and bound to a module's
parameters by ``model.compile`` (or ``bind(params)``); it is then an ordinary torch optimizer (param_groups,
state_dict, GradScaler, torch lr_schedulers). One ``step()`` does, in Keras' order:

1. the learning rate: the group's ``lr``, or ``learning_rate(iterations)`` when that is a schedule/callable;
2. clip the gradients (into new tensors; ``p.grad`` is left as it is): ``clipnorm`` per tensor,
   ``global_clipnorm`` over all tensors of all groups, or ``clipvalue`` (at most one of them is set);
3. weight decay ``w *= 1 - weight_decay * lr``;
4. the optimizer's rule, on torch's multi-tensor ``_foreach`` kernels, one pass set per param group;
5. ``iterations += 1``.

Parameters without a gradient are skipped, as Keras does. ``iterations`` (and any per-step scalar such as
Nadam's momentum product) is a Python number: no host synchronisation per step; it is saved in ``state_dict``
so that a resumed run continues its schedule.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .schedules import LearningRateSchedule

LearningRate = float | LearningRateSchedule | Callable[[int], float]


def _number(name: str, value: Any, low: float = 0.0, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < low or (high is not None
                                                                                          and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"`{name}` must be a number {bounds}; got {value!r}")
    return float(value)


def scalar_type(dtype: torch.dtype) -> Callable[[float], Any]:
    """The number type Keras computes a step's scalars in (bias corrections, ...): the variables' dtype.

    float64 parameters get Python floats; the others numpy float32 scalars (so a float32 model rounds these
    scalars exactly as Keras does, e.g. ``1 - 0.999 ** t``)."""
    return float if dtype == torch.float64 else np.float32


class KerasOptimizer(torch.optim.Optimizer):
    """Base of the Keras-rule optimizers. Subclasses define ``_slots`` and ``_update``."""

    #: state tensors per parameter (Keras' slot names) -> initial value; may depend on the group's settings
    def _slots(self, group: dict[str, Any]) -> dict[str, float]:
        return {}

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
                slots: dict[str, list[torch.Tensor]], lr: float, step: int) -> None:
        """Apply the rule to one group; ``step`` is 1 for the first update (Keras' ``iterations + 1``)."""
        raise NotImplementedError

    def __init__(self, learning_rate: LearningRate, hyper: dict[str, Any], weight_decay: float | None = None,
                 clipnorm: float | None = None, clipvalue: float | None = None,
                 global_clipnorm: float | None = None, name: str | None = None):
        clips = {"clipnorm": clipnorm, "clipvalue": clipvalue, "global_clipnorm": global_clipnorm}
        if sum(v is not None for v in clips.values()) > 1:
            raise ValueError("Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. Received: "
                             + ", ".join(f"{k}={v}" for k, v in clips.items()))
        for key, value in clips.items():
            setattr(self, key, None if value is None else _number(key, value))
        self.name = name or type(self).__name__.lower()
        self._schedule: Callable[[int], Any] | None = None
        self._iterations = 0
        defaults = dict(lr=self._set_schedule(learning_rate),
                        weight_decay=None if weight_decay is None else _number("weight_decay", weight_decay),
                        **hyper)
        # A torch optimizer with no parameter group yet: bind() adds them.
        super().__init__([{"params": []}], defaults)
        self.param_groups = []

    # -- binding ---------------------------------------------------------------------------------------
    @property
    def bound(self) -> bool:
        """Whether the optimizer has parameters (``bind`` or ``model.compile`` gave them)."""
        return bool(self.param_groups)

    def bind(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]]) -> "KerasOptimizer":
        """Give the optimizer its parameters (tensors, or torch-style param-group dicts); returns ``self``."""
        if self.bound:
            raise ValueError(f"this {type(self).__name__} optimizer is already bound to parameters; "
                             "create a new optimizer object for another model")
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)
        return self

    def _parameters(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    # -- Keras attributes ------------------------------------------------------------------------------
    @property
    def iterations(self) -> int:
        """The number of optimizer steps taken."""
        return self._iterations

    @iterations.setter
    def iterations(self, value: int) -> None:
        self._iterations = int(value)
        self._refresh_scheduled_lr()

    @property
    def learning_rate(self) -> float:
        """The learning rate of the next step (a schedule is evaluated at ``iterations``).

        Set a float (every group's ``lr``), or a schedule / callable of the step. As in Keras, an optimizer
        made with a schedule does not take a float (TypeError)."""
        if self._schedule is not None:
            return self._lr_at(self._iterations)
        return (self.param_groups[0] if self.bound else self.defaults)["lr"]

    @learning_rate.setter
    def learning_rate(self, value: LearningRate) -> None:
        if self._schedule is not None and not callable(value):
            raise TypeError("This optimizer was created with a learning-rate schedule; it cannot be set to a float. "
                            "Set another schedule, or create the optimizer with a float `learning_rate`.")
        lr = self._set_schedule(value)
        self.defaults["lr"] = lr
        for group in self.param_groups:
            group["lr"] = lr

    def _set_schedule(self, value: LearningRate) -> float:
        """Record ``value`` (a float or a schedule) and return the float to keep in the groups' ``lr``."""
        if callable(value):
            self._schedule = value
            return self._lr_at(self._iterations)
        self._schedule = None
        return _number("learning_rate", value)

    def _lr_at(self, step: int) -> float:
        return float(self._schedule(step))  # a tensor-valued custom schedule costs one host read here

    def _refresh_scheduled_lr(self) -> None:
        if self._schedule is not None:
            lr = self._lr_at(self._iterations)
            for group in self.param_groups:
                group["lr"] = lr

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, in Keras' names (``learning_rate`` is the float or the schedule object)."""
        settings = self.param_groups[0] if self.bound else self.defaults
        config = {"name": self.name, "learning_rate": self._schedule if self._schedule is not None else settings["lr"]}
        config.update({k: settings[k] for k in self.defaults if k not in ("lr", "differentiable")})
        config.update(clipnorm=self.clipnorm, clipvalue=self.clipvalue, global_clipnorm=self.global_clipnorm)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "KerasOptimizer":
        return cls(**config)

    def __getattr__(self, name: str) -> Any:
        """Keras-style reading of a hyper-parameter (``opt.beta_1``): the first group's value."""
        defaults = self.__dict__.get("defaults")
        if defaults is not None and name in defaults and name not in ("lr", "differentiable"):
            groups = self.__dict__.get("param_groups")
            return (groups[0] if groups else defaults)[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- state -----------------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        """Optimizer-wide numbers saved with the state (besides the per-parameter tensors)."""
        return {"iterations": self._iterations}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._iterations = int(extra.get("iterations", 0))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(self._extra_state())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        names = set(self._extra_state())
        extra = {k: v for k, v in state_dict.items() if k in names}
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in names})
        self._load_extra_state(extra)
        self._refresh_scheduled_lr()

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps only defaults/state/param_groups; our settings live in the other attributes (hooks are
        # not pickled, as in torch).
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}

    # -- the step --------------------------------------------------------------------------------------
    def _begin_step(self, step: int, dtype: torch.dtype) -> None:
        """Optimizer-wide work once per step before the groups are updated (Nadam's momentum product)."""

    def _slot_lists(self, group: dict[str, Any], params: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        slots = self._slots(group)
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if len(state) != len(slots):
                for key, value in slots.items():
                    if key not in state:
                        state[key] = torch.full_like(p, value, memory_format=torch.preserve_format)
        return {key: [state[key] for state in states] for key in slots}

    def _clipped(self, grad_lists: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        if self.clipnorm:
            clipped = []
            for grads in grad_lists:
                norms = torch._foreach_norm(grads)
                torch._foreach_clamp_min_(norms, self.clipnorm)
                torch._foreach_reciprocal_(norms)
                torch._foreach_mul_(norms, self.clipnorm)  # clipnorm / max(norm, clipnorm), per tensor
                clipped.append(torch._foreach_mul(grads, norms))
            return clipped
        if self.global_clipnorm:
            norms = [n for grads in grad_lists for n in torch._foreach_norm(grads)]
            total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].dtype) for n in norms]))
            # clipnorm / max(total, clipnorm); a non-finite total makes the scale NaN, as in Keras
            scale = torch.reciprocal(torch.clamp_min(total, self.global_clipnorm)).mul_(self.global_clipnorm)
            scale = scale + (total - total)
            return [torch._foreach_mul(grads, scale.to(grads[0].dtype)) for grads in grad_lists]
        if self.clipvalue:
            clipped = []
            for grads in grad_lists:
                low = torch._foreach_clamp_min(grads, -self.clipvalue)
                torch._foreach_clamp_max_(low, self.clipvalue)
                clipped.append(low)
            return clipped
        return grad_lists

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Keras update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.bound:
            raise RuntimeError(f"this {type(self).__name__} optimizer has no parameters yet: pass it to "
                               "model.compile(optimizer=...) or call bind(params)")
        step = self._iterations
        scheduled = None if self._schedule is None else self._lr_at(step)
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                work.append((group, params, [p.grad for p in params]))
        if work:
            self._begin_step(step + 1, work[0][1][0].dtype)
            grad_lists = self._clipped([grads for _, _, grads in work])
            for (group, params, _), grads in zip(work, grad_lists):
                lr = group["lr"] if scheduled is None else scheduled
                if group["weight_decay"]:
                    torch._foreach_mul_(params, 1 - group["weight_decay"] * lr)
                self._update(group, params, grads, self._slot_lists(group, params), lr, step + 1)
        self._iterations = step + 1
        self._refresh_scheduled_lr()
        return loss
