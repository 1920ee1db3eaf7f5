"""Small building blocks for the single-process core tests: models whose losses are computable by hand.

Everything is float64 so that dfit's results can be compared with plain numpy/torch to ~1e-12.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

import dfit

F64 = torch.float64


def fixed_linear(weight, bias, dtype=F64) -> nn.Linear:
    """An ``nn.Linear`` with the given weight matrix (out, in) and bias (out,)."""
    weight = torch.as_tensor(np.asarray(weight, dtype=np.float64)).to(dtype)
    layer = nn.Linear(weight.shape[1], weight.shape[0], dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(torch.as_tensor(np.asarray(bias, dtype=np.float64)).to(dtype))
    return layer


def frozen(params) -> torch.optim.Optimizer:
    """SGD with lr=0: fit runs every step but the weights never move, so losses are closed-form."""
    return torch.optim.SGD(params, lr=0.0)


class Recorder(nn.Module):
    """``y = w * x + b`` (one feature) that records every batch it is called with, and in which mode."""

    def __init__(self, w: float = 1.0, b: float = 0.0, d_in: int = 1, d_out: int = 1):
        super().__init__()
        self.lin = fixed_linear(np.full((d_out, d_in), w), np.full(d_out, b))
        self.calls: list[tuple[bool, torch.Tensor]] = []

    def forward(self, x):
        self.calls.append((self.training, x.detach().clone()))
        return self.lin(x)

    def rows(self, training: bool) -> list[list[int]]:
        """The row ids (x holds the row index in column 0) of each recorded batch of the given mode."""
        return [c[:, 0].round().long().tolist() for t, c in self.calls if t == training]


def row_ids(n: int) -> np.ndarray:
    """x whose only feature is the row index: a Recorder reveals exactly which rows it saw."""
    return np.arange(n, dtype=np.float64).reshape(n, 1)


def frozen_model(module: nn.Module, loss="mse", **compile_kwargs) -> dfit.Model:
    model = dfit.Model(module)
    model.compile(optimizer=frozen, loss=loss, **compile_kwargs)
    return model


def mse_rows(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Keras' per-sample MSE: mean of squared errors over the last axis."""
    pred, y = np.asarray(pred, np.float64), np.asarray(y, np.float64)
    return ((pred - y.reshape(pred.shape)) ** 2).mean(axis=-1)
