"""Sample weights: validation of user weights and Keras' ``class_weight`` as per-sample weights."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .arrays import to_tensor


def sample_weight_tensor(sample_weight: Any, n: int, temporal: bool, dtype: torch.dtype) -> torch.Tensor:
    """User sample weights as a float tensor of shape (n,) (or (n, timesteps) when temporal)."""
    w = to_tensor(sample_weight, "sample_weight", dtype)
    if not w.is_floating_point():
        w = w.to(dtype)
    if w.dim() == 2 and w.shape[1] == 1 and not temporal:
        w = w[:, 0]
    if temporal and w.dim() != 2:
        raise ValueError(
            f"sample_weight_mode='temporal' expects sample_weight of shape (samples, timesteps); got {tuple(w.shape)}"
        )
    if not temporal and w.dim() != 1:
        raise ValueError(
            f"sample_weight must have shape (samples,); got {tuple(w.shape)}. "
            "For per-timestep weights compile with sample_weight_mode='temporal'"
        )
    if len(w) != n:
        raise ValueError(f"sample_weight has {len(w)} rows but x has {n} samples")
    return w


def class_ids(y: torch.Tensor) -> torch.Tensor:
    """The integer class of every label: the label itself, or the argmax of a one-hot row."""
    if y.dim() >= 2 and y.shape[-1] > 1:  # one-hot rows, float or integer (Keras takes argmax either way)
        return y.argmax(dim=-1)
    if y.dim() >= 2 and y.shape[-1] == 1:
        y = y[..., 0]
    return y.round().long() if y.is_floating_point() else y.long()


def class_weight_tensor(y: Any, class_weight: Mapping[int, float], dtype: torch.dtype) -> torch.Tensor:
    """Per-sample weights from ``class_weight`` (classes not listed weigh 1.0)."""
    if not isinstance(y, torch.Tensor):
        raise ValueError("class_weight is only supported for a single output (y must be one array)")
    if not isinstance(class_weight, Mapping):
        raise TypeError(f"class_weight must be a dict {{class_id: weight}}; got {type(class_weight).__name__}")
    ids = class_ids(y)
    top = max(int(ids.max()) + 1, max((int(k) for k in class_weight), default=-1) + 1)
    table = torch.ones(top, dtype=dtype)
    for k, v in class_weight.items():
        if int(k) < 0:
            raise ValueError(f"class_weight has a negative class id {k}")
        table[int(k)] = float(v)
    return table[ids]
