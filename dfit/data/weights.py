"""Sample weights: validation of user weights and Keras' ``class_weight`` as per-sample weights."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .arrays import to_tensor
from .lazy import DiskArray, in_place


def sample_weight_tensor(sample_weight: Any, n: int, temporal: bool, dtype: torch.dtype) -> torch.Tensor | DiskArray:
    """User sample weights as a float tensor of shape (n,) (or (n, timesteps) when temporal); weights in a file
    (a memmap, an h5py dataset, ...) stay there, read a batch at a time (``lazy.DiskArray``)."""
    disk = in_place(sample_weight, "sample_weight")
    shape = tuple(disk.shape) if disk is not None else None
    if disk is None:
        w = to_tensor(sample_weight, "sample_weight", dtype)
        if not w.is_floating_point():
            w = w.to(dtype)
        shape = tuple(w.shape)
    squeeze = len(shape) == 2 and shape[1] == 1 and not temporal
    if squeeze:
        shape = shape[:1]
    if temporal and len(shape) != 2:
        raise ValueError(
            f"sample_weight_mode='temporal' expects sample_weight of shape (samples, timesteps); got {shape}"
        )
    if not temporal and len(shape) != 1:
        raise ValueError(
            f"sample_weight must have shape (samples,); got {shape}. "
            "For per-timestep weights compile with sample_weight_mode='temporal'"
        )
    if shape[0] != n:
        raise ValueError(f"sample_weight has {shape[0]} rows but x has {n} samples")
    if disk is not None:
        return disk.converted(dtype, weights=True, squeeze=squeeze)
    return w[:, 0] if squeeze else w


def class_ids(y: torch.Tensor) -> torch.Tensor:
    """The integer class of every label: the label itself, or the argmax of a one-hot row."""
    if y.dim() >= 2 and y.shape[-1] > 1:  # one-hot rows, float or integer (Keras takes argmax either way)
        return y.argmax(dim=-1)
    if y.dim() >= 2 and y.shape[-1] == 1:
        y = y[..., 0]
    return y.round().long() if y.is_floating_point() else y.long()


def class_weight_tensor(y: Any, class_weight: Mapping[int, float], dtype: torch.dtype) -> torch.Tensor:
    """Per-sample weights from ``class_weight`` (classes not listed weigh 1.0); labels read in place are read once,
    in chunks, to find every row's class (the weights are then in memory)."""
    if isinstance(y, DiskArray):
        y = y.read_all()
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
