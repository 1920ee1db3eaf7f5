"""The data layer: every input kind behind one small interface, "this rank's part of global batch k".

An adapter has ``n`` (rows), ``split(f)``, ``steps_per_pass(batch_size)`` and
``epoch(epoch, batch_size, steps, shuffle, seed, rank, world) -> Iterator[Batch]``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from .arrays import ArrayData, Batch, to_structure
from .datasets import DatasetData
from .epochs import EpochIterator
from .streams import StreamData, is_stream, per_rank
from .weights import class_weight_tensor, sample_weight_tensor

__all__ = ["adapt", "Batch", "ArrayData", "DatasetData", "StreamData", "EpochIterator", "per_rank", "is_stream",
           "class_weight_tensor", "sample_weight_tensor"]


def _is_map_dataset(x: Any) -> bool:
    return isinstance(x, Dataset) and not isinstance(x, IterableDataset) and hasattr(x, "__len__")


def adapt(x: Any, y: Any = None, sample_weight: Any = None, *, float_dtype: torch.dtype,
          temporal: bool = False, what: str = "x"):
    """Wrap user data in the adapter for its kind; every check here runs before any collective."""
    if x is None:
        raise ValueError(f"{what} is required")
    if isinstance(x, TensorDataset):
        if y is not None:
            raise ValueError("y must be None when x is a Dataset (the Dataset yields the targets)")
        tensors = list(x.tensors) + [None] * (3 - len(x.tensors))
        x, y, sample_weight = tensors[:3]
    elif _is_map_dataset(x):
        if y is not None or sample_weight is not None:
            raise ValueError("y and sample_weight must be None when x is a Dataset (it yields them)")
        return DatasetData(x, float_dtype)
    elif is_stream(x):
        if y is not None or sample_weight is not None:
            raise ValueError(f"y and sample_weight must be None when {what} is a stream of batches: its items are "
                             "(x, y) or (x, y, sample_weight)")
        return StreamData(x, float_dtype, temporal, what)
    elif isinstance(x, torch.utils.data.DataLoader):
        raise NotImplementedError("a DataLoader over a map-style Dataset is not supported yet; pass its dataset")
    xs = to_structure(x, what, float_dtype)
    ys = None if y is None else to_structure(y, "y", float_dtype)
    n = ArrayData(xs, ys).n
    w = None if sample_weight is None else sample_weight_tensor(sample_weight, n, temporal, float_dtype)
    return ArrayData(xs, ys, w)
