"""Keras 3's optimizers, each as its update rule on torch's multi-tensor ``_foreach`` kernels.

Arguments, names and defaults are Keras 3's. Every class also takes Keras' common arguments ``weight_decay``,
``clipnorm``, ``clipvalue``, ``global_clipnorm`` and ``name`` (see ``base.KerasOptimizer`` for the step order).
In the formulas below ``g`` is the (clipped) gradient, ``t`` the step number (1 for the first update) and
``lr`` the learning rate of the step.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import KerasOptimizer, LearningRate, _number, scalar_type

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax", "Nadam"]

_List = list[torch.Tensor]


def _common(weight_decay, clipnorm, clipvalue, global_clipnorm, name) -> dict[str, Any]:
    return dict(weight_decay=weight_decay, clipnorm=clipnorm, clipvalue=clipvalue, global_clipnorm=global_clipnorm,
                name=name)


class SGD(KerasOptimizer):
    """``m = momentum * m - lr * g``; ``w += momentum * m - lr * g`` if ``nesterov`` else ``w += m``
    (``w -= lr * g`` without momentum)."""

    def __init__(self, learning_rate: LearningRate = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float | None = None, clipnorm: float | None = None, clipvalue: float | None = None,
                 global_clipnorm: float | None = None, name: str | None = None):
        hyper = dict(momentum=_number("momentum", momentum, 0.0, 1.0), nesterov=bool(nesterov))
        super().__init__(learning_rate, hyper, **_common(weight_decay, clipnorm, clipvalue, global_clipnorm, name))

    def _slots(self, group):
        return {"momentum": 0.0} if group["momentum"] != 0 else {}

    def _update(self, group, params: _List, grads: _List, slots, lr: float, step: int) -> None:
        momentum = group["momentum"]
        if momentum == 0:
            torch._foreach_add_(params, grads, alpha=-lr)
            return
        m = slots["momentum"]
        torch._foreach_mul_(m, momentum)
        torch._foreach_add_(m, grads, alpha=-lr)
        if group["nesterov"]:
            torch._foreach_add_(params, grads, alpha=-lr)
            torch._foreach_add_(params, m, alpha=momentum)
        else:
            torch._foreach_add_(params, m)


class Adam(KerasOptimizer):
    """``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g^2`` (``v_hat = max(v_hat, v)`` used for ``v`` with amsgrad);
    ``w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + epsilon)``."""

    def __init__(self, learning_rate: LearningRate = 0.001, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-7, amsgrad: bool = False, weight_decay: float | None = None,
                 clipnorm: float | None = None, clipvalue: float | None = None,
                 global_clipnorm: float | None = None, name: str | None = None):
        super().__init__(learning_rate, _adam_hyper(beta_1, beta_2, epsilon, amsgrad=bool(amsgrad)),
                         **_common(weight_decay, clipnorm, clipvalue, global_clipnorm, name))

    def _slots(self, group):
        slots = {"momentum": 0.0, "velocity": 0.0}
        if group["amsgrad"]:
            slots["velocity_hat"] = 0.0
        return slots

    def _update(self, group, params: _List, grads: _List, slots, lr: float, step: int) -> None:
        beta_1, beta_2 = group["beta_1"], group["beta_2"]
        m, v = slots["momentum"], slots["velocity"]
        torch._foreach_lerp_(m, grads, 1 - beta_1)
        torch._foreach_mul_(v, beta_2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta_2)
        if group["amsgrad"]:
            torch._foreach_maximum_(slots["velocity_hat"], v)
            v = slots["velocity_hat"]
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, group["epsilon"])
        real = scalar_type(params[0].dtype)
        one, t = real(1), real(step)
        alpha = real(lr) * np.sqrt(one - real(beta_2) ** t) / (one - real(beta_1) ** t)
        torch._foreach_addcdiv_(params, m, denom, value=-float(alpha))


def _adam_hyper(beta_1, beta_2, epsilon, **more: Any) -> dict[str, Any]:
    """The checked moment settings of the Adam family (Adam, AdamW, Adamax, Nadam), plus ``more``."""
    return dict(beta_1=_number("beta_1", beta_1, 0.0, 1.0), beta_2=_number("beta_2", beta_2, 0.0, 1.0),
                epsilon=_number("epsilon", epsilon), **more)


class AdamW(Adam):
    """Adam with decoupled weight decay (Keras' step: ``w *= 1 - weight_decay * lr`` before the Adam update)."""

    def __init__(self, learning_rate: LearningRate = 0.001, weight_decay: float = 0.004, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-7, amsgrad: bool = False, clipnorm: float | None = None,
                 clipvalue: float | None = None, global_clipnorm: float | None = None, name: str | None = None):
        if weight_decay is None:
            raise ValueError("Argument `weight_decay` must be a float. Received: weight_decay=None")
        super().__init__(learning_rate, beta_1, beta_2, epsilon, amsgrad, weight_decay, clipnorm, clipvalue,
                         global_clipnorm, name)


class RMSprop(KerasOptimizer):
    """``v = rho v + (1-rho) g^2``; ``d = sqrt(v + epsilon)`` (centered: ``a = rho a + (1-rho) g``,
    ``d = sqrt(v + epsilon - a^2)``); ``w -= lr g / d``, or with momentum ``u = momentum u + lr g / d; w -= u``."""

    def __init__(self, learning_rate: LearningRate = 0.001, rho: float = 0.9, momentum: float = 0.0,
                 epsilon: float = 1e-7, centered: bool = False, weight_decay: float | None = None,
                 clipnorm: float | None = None, clipvalue: float | None = None,
                 global_clipnorm: float | None = None, name: str | None = None):
        hyper = dict(rho=_number("rho", rho, 0.0, 1.0), momentum=_number("momentum", momentum, 0.0, 1.0),
                     epsilon=_number("epsilon", epsilon), centered=bool(centered))
        super().__init__(learning_rate, hyper, **_common(weight_decay, clipnorm, clipvalue, global_clipnorm, name))

    def _slots(self, group):
        slots = {"velocity": 0.0}
        if group["momentum"] > 0:
            slots["momentum"] = 0.0
        if group["centered"]:
            slots["average_gradient"] = 0.0
        return slots

    def _update(self, group, params: _List, grads: _List, slots, lr: float, step: int) -> None:
        rho, v = group["rho"], slots["velocity"]
        torch._foreach_mul_(v, rho)
        torch._foreach_addcmul_(v, grads, grads, value=1 - rho)
        denom = torch._foreach_add(v, group["epsilon"])
        if group["centered"]:
            average = slots["average_gradient"]
            torch._foreach_lerp_(average, grads, 1 - rho)
            torch._foreach_addcmul_(denom, average, average, value=-1)
        torch._foreach_sqrt_(denom)
        if group["momentum"] > 0:
            u = slots["momentum"]
            torch._foreach_mul_(u, group["momentum"])
            torch._foreach_addcdiv_(u, grads, denom, value=lr)
            torch._foreach_sub_(params, u)
        else:
            torch._foreach_addcdiv_(params, grads, denom, value=-lr)


class Adagrad(KerasOptimizer):
    """``acc += g^2`` (``acc`` starts at ``initial_accumulator_value``); ``w -= lr g / sqrt(acc + epsilon)``."""

    def __init__(self, learning_rate: LearningRate = 0.001, initial_accumulator_value: float = 0.1,
                 epsilon: float = 1e-7, weight_decay: float | None = None, clipnorm: float | None = None,
                 clipvalue: float | None = None, global_clipnorm: float | None = None, name: str | None = None):
        hyper = dict(initial_accumulator_value=_number("initial_accumulator_value", initial_accumulator_value),
                     epsilon=_number("epsilon", epsilon))
        super().__init__(learning_rate, hyper, **_common(weight_decay, clipnorm, clipvalue, global_clipnorm, name))

    def _slots(self, group):
        return {"accumulator": group["initial_accumulator_value"]}

    def _update(self, group, params: _List, grads: _List, slots, lr: float, step: int) -> None:
        accumulator = slots["accumulator"]
        torch._foreach_addcmul_(accumulator, grads, grads)
        denom = torch._foreach_add(accumulator, group["epsilon"])
        torch._foreach_sqrt_(denom)
        torch._foreach_addcdiv_(params, grads, denom, value=-lr)


class Adadelta(KerasOptimizer):
    """``G = rho G + (1-rho) g^2``; ``delta = -sqrt(D + epsilon) / sqrt(G + epsilon) * g``;
    ``D = rho D + (1-rho) delta^2``; ``w += lr * delta``."""

    def __init__(self, learning_rate: LearningRate = 0.001, rho: float = 0.95, epsilon: float = 1e-7,
                 weight_decay: float | None = None, clipnorm: float | None = None, clipvalue: float | None = None,
                 global_clipnorm: float | None = None, name: str | None = None):
        hyper = dict(rho=_number("rho", rho, 0.0, 1.0), epsilon=_number("epsilon", epsilon))
        super().__init__(learning_rate, hyper, **_common(weight_decay, clipnorm, clipvalue, global_clipnorm, name))

    def _slots(self, group):
        return {"accumulated_grad": 0.0, "accumulated_delta_var": 0.0}

    def _update(self, group, params: _List, grads: _List, slots, lr: float, step: int) -> None:
        rho, epsilon = group["rho"], group["epsilon"]
        grad_acc, delta_acc = slots["accumulated_grad"], slots["accumulated_delta_var"]
        torch._foreach_mul_(grad_acc, rho)
        torch._foreach_addcmul_(grad_acc, grads, grads, value=1 - rho)
        step_size = torch._foreach_add(delta_acc, epsilon)  # becomes -delta
        torch._foreach_sqrt_(step_size)
        torch._foreach_mul_(step_size, grads)
        denom = torch._foreach_add(grad_acc, epsilon)
        torch._foreach_sqrt_(denom)
        torch._foreach_div_(step_size, denom)
        torch._foreach_mul_(delta_acc, rho)
        torch._foreach_addcmul_(delta_acc, step_size, step_size, value=1 - rho)
        torch._foreach_add_(params, step_size, alpha=-lr)


class Adamax(KerasOptimizer):
    """``m = b1 m + (1-b1) g``; ``u = max(b2 u, |g|)``; ``w -= lr m / ((u + epsilon) (1 - b1^t))``."""

    def __init__(self, learning_rate: LearningRate = 0.001, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-7, weight_decay: float | None = None, clipnorm: float | None = None,
                 clipvalue: float | None = None, global_clipnorm: float | None = None, name: str | None = None):
        super().__init__(learning_rate, _adam_hyper(beta_1, beta_2, epsilon),
                         **_common(weight_decay, clipnorm, clipvalue, global_clipnorm, name))

    def _slots(self, group):
        return {"m": 0.0, "u": 0.0}

    def _update(self, group, params: _List, grads: _List, slots, lr: float, step: int) -> None:
        m, u = slots["m"], slots["u"]
        torch._foreach_lerp_(m, grads, 1 - group["beta_1"])
        torch._foreach_mul_(u, group["beta_2"])
        torch._foreach_maximum_(u, torch._foreach_abs(grads))
        denom = torch._foreach_add(u, group["epsilon"])
        real = scalar_type(params[0].dtype)
        correction = real(1) - real(group["beta_1"]) ** real(step)
        torch._foreach_addcdiv_(params, m, denom, value=-lr / float(correction))


class Nadam(KerasOptimizer):
    """Adam with Keras' Nesterov momentum schedule ``mu_t = b1 (1 - 0.5 * 0.96^t)`` and ``P_t = mu_1 ... mu_t``:
    ``m_hat = mu_{t+1} m / (1 - P_t mu_{t+1}) + (1 - mu_t) g / (1 - P_t)``, ``v_hat = v / (1 - b2^t)``,
    ``w -= lr m_hat / (sqrt(v_hat) + epsilon)``. ``P_t`` is a number of the optimizer, saved in its state."""

    def __init__(self, learning_rate: LearningRate = 0.001, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-7, weight_decay: float | None = None, clipnorm: float | None = None,
                 clipvalue: float | None = None, global_clipnorm: float | None = None, name: str | None = None):
        super().__init__(learning_rate, _adam_hyper(beta_1, beta_2, epsilon),
                         **_common(weight_decay, clipnorm, clipvalue, global_clipnorm, name))
        self._u_product = 1.0

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "u_product": self._u_product}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self._u_product = float(extra.get("u_product", 1.0))

    def _momentum_at(self, step: int, beta_1: float, real) -> Any:
        return real(beta_1) * (real(1) - real(0.5) * real(0.96) ** real(step))

    def _begin_step(self, step: int, dtype: torch.dtype) -> None:
        real = scalar_type(dtype)
        self._previous_u_product = self._u_product
        self._u_product = float(real(self._u_product) * self._momentum_at(step, self.defaults["beta_1"], real))

    def _slots(self, group):
        return {"momentum": 0.0, "velocity": 0.0}

    def _update(self, group, params: _List, grads: _List, slots, lr: float, step: int) -> None:
        beta_1, beta_2 = group["beta_1"], group["beta_2"]
        real = scalar_type(params[0].dtype)
        one = real(1)
        u_t, u_next = self._momentum_at(step, beta_1, real), self._momentum_at(step + 1, beta_1, real)
        u_product = real(self._previous_u_product) * u_t
        m, v = slots["momentum"], slots["velocity"]
        torch._foreach_lerp_(m, grads, 1 - beta_1)
        torch._foreach_mul_(v, beta_2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta_2)
        m_hat = torch._foreach_mul(m, float(u_next / (one - u_product * u_next)))
        torch._foreach_add_(m_hat, grads, alpha=float((one - u_t) / (one - u_product)))
        denom = torch._foreach_mul(v, float(one / (one - real(beta_2) ** real(step))))
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["epsilon"])
        torch._foreach_addcdiv_(params, m_hat, denom, value=-lr)
