"""The data layer: every input kind behind one small interface, "this rank's part of global batch k".

An adapter has ``n`` (rows), ``split(f)``, ``steps_per_pass(batch_size)`` and
``epoch(epoch, batch_size, steps, shuffle, seed, rank, world) -> Iterator[Batch]``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from .arrays import ArrayData, Batch, to_structure
from .datasets import DatasetData
from .epochs import EpochIterator
from .lazy import Columns, DataFileError, DiskArray, columns, materialize
from .loading import LoadOptions, check_loading_arguments, loader_settings
from .streams import StreamData, is_stream, per_rank
from .weights import class_weight_tensor, sample_weight_tensor

__all__ = ["adapt", "Batch", "ArrayData", "DatasetData", "StreamData", "EpochIterator", "per_rank", "is_stream",
           "LoadOptions", "check_loading_arguments",
           "class_weight_tensor", "sample_weight_tensor", "columns", "Columns", "DiskArray", "DataFileError",
           "materialize"]


def _is_map_dataset(x: Any) -> bool:
    return isinstance(x, Dataset) and not isinstance(x, IterableDataset) and hasattr(x, "__len__")


def adapt(x: Any, y: Any = None, sample_weight: Any = None, *, float_dtype: torch.dtype,
          temporal: bool = False, what: str = "x", loading: LoadOptions | None = None):
    """Wrap user data in the adapter for its kind; every check here runs before any collective.

    ``loading`` (from fit's ``workers``/``max_queue_size``) says how a map-style Dataset is read; a user's
    ``DataLoader`` brings its own options, and ``loading`` must then ask for no workers or the loader's number.
    """
    if x is None:
        raise ValueError(f"{what} is required")
    loading = loading or LoadOptions()
    if isinstance(x, Columns):   # a Hugging Face dataset with its columns named: arrays read in place
        if y is not None or sample_weight is not None:
            raise ValueError(f"y and sample_weight must be None when {what} is dfit.data.columns(...): name their "
                             "columns there (y=..., sample_weight=...)")
        x, y, sample_weight = x.x, x.y, x.sample_weight
    if isinstance(x, DataLoader) and _is_map_dataset(x.dataset):
        if y is not None or sample_weight is not None:
            raise ValueError("y and sample_weight must be None when x is a DataLoader (its items bring them)")
        settings = loader_settings(x)
        if loading.num_workers and loading.num_workers != settings.options.num_workers:
            raise ValueError(f"workers={loading.num_workers} was given with a DataLoader of num_workers="
                             f"{settings.options.num_workers}; a DataLoader brings its own workers (set num_workers "
                             "on the DataLoader, and leave workers at 0)")
        return DatasetData(x.dataset, float_dtype, options=settings.options, batch_size=settings.batch_size,
                           shuffle=settings.shuffle, drop_last=settings.drop_last)
    if isinstance(x, TensorDataset):
        if y is not None:
            raise ValueError("y must be None when x is a Dataset (the Dataset yields the targets)")
        tensors = list(x.tensors) + [None] * (3 - len(x.tensors))
        x, y, sample_weight = tensors[:3]
    elif _is_map_dataset(x):
        if y is not None or sample_weight is not None:
            raise ValueError("y and sample_weight must be None when x is a Dataset (it yields them)")
        return DatasetData(x, float_dtype, options=loading)
    elif is_stream(x):
        if y is not None or sample_weight is not None:
            raise ValueError(f"y and sample_weight must be None when {what} is a stream of batches: its items are "
                             "(x, y) or (x, y, sample_weight)")
        prefetch = loading.num_workers * (loading.prefetch_factor or 2)   # workers > 0: read on a thread
        return StreamData(x, float_dtype, temporal, what, prefetch=prefetch)
    xs = to_structure(x, what, float_dtype)
    ys = None if y is None else to_structure(y, "y", float_dtype)
    n = ArrayData(xs, ys).n
    w = None if sample_weight is None else sample_weight_tensor(sample_weight, n, temporal, float_dtype)
    return ArrayData(xs, ys, w)

