"""In-memory inputs (numpy, torch, pandas, lists and dicts of them) as tensors batched by whole-batch indexing."""
from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import numpy as np
import torch

from .lazy import check_files, disk_leaves, in_place, read_rows
from .sharding import epoch_rows, num_batches, split_point
from .structure import flatten, index_rows


class Batch(NamedTuple):
    """This rank's part of one global batch, and the size of the whole global batch."""

    x: Any
    y: Any
    sample_weight: torch.Tensor | None
    size: int          # rows on this rank
    global_size: int   # rows in the global batch (what losses are normalised by)


def _is_leaf_array(v: Any) -> bool:
    return isinstance(v, (np.ndarray, torch.Tensor)) or hasattr(v, "to_numpy")


def to_tensor(v: Any, name: str, float_dtype: torch.dtype | None) -> torch.Tensor:
    """One array-like as a CPU tensor, floats cast to ``float_dtype`` (numpy memory shared when possible)."""
    if hasattr(v, "to_numpy") and not isinstance(v, (np.ndarray, torch.Tensor)):  # pandas
        v = v.to_numpy()
    if isinstance(v, torch.Tensor):
        t = v.detach()
    else:
        arr = np.asarray(v)
        if arr.dtype == object:
            raise TypeError(f"{name}: cannot turn an array of Python objects into a tensor")
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{name}: unsupported dtype {arr.dtype}; expected numbers")
        if not arr.flags.writeable:
            arr = arr.copy()
        if arr.ndim == 0:  # checked before ascontiguousarray, which would make it a 1-row array
            raise ValueError(f"{name}: expected an array with a first (samples) axis, got a scalar")
        arr = np.ascontiguousarray(arr)
        t = torch.from_numpy(arr)
    if t.dim() == 0:
        raise ValueError(f"{name}: expected an array with a first (samples) axis, got a scalar")
    if float_dtype is not None and t.is_floating_point() and t.dtype != float_dtype:
        t = t.to(float_dtype)
    if t.dtype == torch.bool:
        t = t.to(float_dtype or torch.get_default_dtype())
    return t


def to_structure(v: Any, name: str, float_dtype: torch.dtype | None) -> Any:
    """Arrays, or a list/tuple/dict of arrays, as the same structure of tensors."""
    if isinstance(v, dict):
        return {k: to_structure(item, f"{name}[{k!r}]", float_dtype) for k, item in v.items()}
    if isinstance(v, (list, tuple)) and any(_is_leaf_array(i) or isinstance(i, dict) for i in v):
        return [to_structure(item, f"{name}[{i}]", float_dtype) for i, item in enumerate(v)]
    if v is None:
        raise TypeError(f"{name} is None")
    disk = in_place(v, name)
    if disk is not None:   # a memmap, a file-backed tensor, an h5py dataset: read in place, a batch at a time
        return disk.converted(float_dtype)
    if not (_is_leaf_array(v) or isinstance(v, (list, tuple))):
        raise TypeError(
            f"{name}: unsupported type {type(v).__name__}; expected a numpy array, torch tensor, pandas "
            "object, a list or dict of them, a torch Dataset, or an iterable of batches"
        )
    return to_tensor(v, name, float_dtype)


def check_lengths(named: dict[str, Any]) -> int:
    """All leaves must have the same number of rows; return it."""
    lengths = {}
    for label, s in named.items():
        if s is None:
            continue
        for i, leaf in enumerate(flatten(s)):
            lengths[f"{label}" if len(flatten(s)) == 1 else f"{label}[{i}]"] = len(leaf)
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in lengths.items())
        raise ValueError(f"Data cardinality is ambiguous: inputs must all have the same number of samples ({detail})")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError("Empty input: x has 0 samples")
    return n


class ArrayData:
    """Tensors in memory. The data adapter for arrays: this rank's part of global batch k, by indexing."""

    def __init__(self, x: Any, y: Any = None, sample_weight: torch.Tensor | None = None):
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.n = check_lengths({"x": x, "y": y, "sample_weight": sample_weight})
        self.on_disk = disk_leaves(x, y, sample_weight)   # leaves read in place (lazy.DiskArray)

    # -- Keras data semantics ------------------------------------------------------------------------
    def take(self, rows: slice) -> "ArrayData":
        w = None if self.sample_weight is None else self.sample_weight[rows]
        y = None if self.y is None else index_rows(self.y, rows)
        return ArrayData(index_rows(self.x, rows), y, w)

    def split(self, validation_split: float) -> tuple["ArrayData", "ArrayData"]:
        """Keras' split: the LAST ``n - int(n * (1 - f))`` rows, before shuffling, are validation data."""
        n_train = split_point(self.n, validation_split)
        return self.take(slice(0, n_train)), self.take(slice(n_train, self.n))

    def with_weights(self, sample_weight: torch.Tensor | None) -> "ArrayData":
        return ArrayData(self.x, self.y, sample_weight)

    # -- the adapter interface -------------------------------------------------------------------------
    def steps_per_pass(self, batch_size: int) -> int:
        return num_batches(self.n, batch_size)

    starts_mid_epoch = True  # epoch(..., start=s) skips the first s steps without reading them

    def epoch(self, epoch: int, batch_size: int, steps: int | None, shuffle: bool, seed: int,
              rank: int, world: int, start: int = 0) -> Iterator[Batch]:
        """The batches of one epoch (see ``sharding.epoch_rows`` for how steps map to passes), from step ``start``.

        Data read in place: every rank checks the files' sizes first, and the ranks agree (``lazy.check_files``)."""
        if self.on_disk:
            check_files(self.on_disk, rank, world)
        for rows, global_size in epoch_rows(self.n, batch_size, epoch, steps, shuffle, seed, rank, world,
                                            start=start):
            size = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
            y = None if self.y is None else read_rows(self.y, rows)
            w = None if self.sample_weight is None else read_rows(self.sample_weight, rows)
            yield Batch(read_rows(self.x, rows), y, w, size, global_size)

    def __len__(self) -> int:
        return self.n
