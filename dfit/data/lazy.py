"""Arrays larger than memory, read in place: NumPy memmaps, file-backed tensors, h5py datasets and the Arrow columns
of a Hugging Face ``datasets.Dataset``.

Each becomes a ``DiskArray``: a leaf of the data structure that stays where it is. A step reads this rank's rows of
the global batch with ONE batched read (a range, or the sorted unique row ids then put back in order: h5py needs
increasing indices), and casts that batch's floats to the model's dtype. A contiguous range of rows (what
``validation_split`` takes) is a view, never a copy. Pickled (``multi_gpu_model`` with ``spawn``), a leaf carries
where its data lives (file, offset, dtype, shape), and the worker opens the same file.

The files' sizes are checked at the start of every epoch, agreed by all ranks (a file truncated on any rank stops
every rank with an error naming it), and before every read on the reading rank (a clear error instead of a
``SIGBUS``).
"""
from __future__ import annotations

import copy
import mmap
import os
import sys
import time
from typing import Any, Iterable

import numpy as np
import torch

from .. import distributed as dist
from .structure import flatten, map_structure

__all__ = ["DiskArray", "DataFileError", "Columns", "columns", "in_place", "check_files", "read_rows",
           "materialize"]


FILES_CHECKED_EVERY_READ = 8   # a leaf of up to this many files has their sizes checked before every read
READ_CHECK_S = 1.0             # else at most once every this many seconds


class DataFileError(OSError):
    """A file that data is read from in place was truncated, removed or replaced while the job ran."""


def _numeric(dtype: np.dtype, name: str) -> None:
    if dtype == object:
        raise TypeError(f"{name}: cannot turn an array of Python objects into a tensor")
    if dtype.kind not in "biuf":
        raise TypeError(f"{name}: unsupported dtype {dtype}; expected numbers")


class DiskArray:
    """Rows ``[start, stop)`` of an array that is read in place; ``read(rows)`` gathers rows in one batched read."""

    def __init__(self, length: int, row_shape: tuple[int, ...], dtype: np.dtype, name: str):
        self.start, self.stop = 0, int(length)
        self.row_shape, self.dtype, self.name = tuple(row_shape), np.dtype(dtype), name
        self.cast: torch.dtype | None = None   # floats (and bools) become this dtype
        self.weights = False                   # sample weights: every dtype becomes ``cast``
        self.squeeze = False                   # (n, 1) weights read as (n,)

    def __copy__(self) -> "DiskArray":
        """A view shares the opened file (pickling, not copying, drops it)."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        return out

    # -- shape and views ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self),) + self.row_shape

    def dim(self) -> int:
        return len(self.shape)

    def __getitem__(self, rows: slice) -> "DiskArray":
        """A contiguous range of rows: a view of the same file."""
        if not isinstance(rows, slice):
            raise TypeError(f"{self.name}: an array read in place is indexed by read(rows); got {type(rows).__name__}")
        a, b, step = rows.indices(len(self))
        if step != 1:
            raise ValueError(f"{self.name}: only contiguous row ranges of an array read in place are views")
        view = copy.copy(self)
        view.start, view.stop = self.start + a, self.start + max(a, b)
        return view

    def converted(self, cast: torch.dtype | None, weights: bool = False, squeeze: bool = False) -> "DiskArray":
        """The same rows, read with floats cast to ``cast`` (``weights``: every dtype; ``squeeze``: (n, 1) -> (n,))."""
        out = copy.copy(self)
        out.cast, out.weights, out.squeeze = cast, weights, squeeze
        return out

    # -- reading -----------------------------------------------------------------------------------------
    def read(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (a range, or row ids relative to this view) as a tensor, in one batched read."""
        self._check_now()
        if isinstance(rows, slice):
            a, b, step = rows.indices(len(self))
            if step != 1:
                raise ValueError(f"{self.name}: row ranges must be contiguous")
            return self._tensor(self._read_range(self.start + a, self.start + max(a, b)))
        ids = np.asarray(rows.cpu().numpy() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
        if ids.size == 0:
            return self._tensor(self._read_range(self.start, self.start))
        if ids.min() < 0 or ids.max() >= len(self):
            raise IndexError(f"{self.name}: row ids out of range [0, {len(self)})")
        unique, inverse = np.unique(ids, return_inverse=True)
        got = self._read_sorted(unique + self.start)
        if len(unique) == len(ids) and np.array_equal(unique, ids):
            return self._tensor(got)
        return self._tensor(got[torch.from_numpy(inverse.reshape(-1))] if isinstance(got, torch.Tensor)
                            else got[inverse.reshape(-1)])

    def _tensor(self, got: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(got, np.ndarray) and not got.flags.writeable:   # a zero-copy view of an Arrow buffer
            got = got.copy()
        t = got if isinstance(got, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(got))
        if self.cast is not None and (t.is_floating_point() or self.weights) and t.dtype != self.cast:
            t = t.to(self.cast)
        if t.dtype == torch.bool:
            t = t.to(self.cast or torch.get_default_dtype())
        return t[:, 0] if self.squeeze else t

    def read_all(self, chunk_rows: int = 1 << 16) -> torch.Tensor:
        """Every row of this view in memory (read in chunks); for what needs all of it, e.g. ``class_weight``."""
        parts = [self.read(slice(a, min(a + chunk_rows, len(self)))) for a in range(0, len(self), chunk_rows)]
        return torch.cat(parts) if parts else self.read(slice(0, 0))

    # what a kind of file implements -------------------------------------------------------------------
    def _read_range(self, a: int, b: int) -> np.ndarray | torch.Tensor:
        raise NotImplementedError

    def _read_sorted(self, ids: np.ndarray) -> np.ndarray | torch.Tensor:
        raise NotImplementedError

    def files(self) -> list[tuple[str, int]]:
        """(path, bytes the data needs it to have) of every file the rows are read from."""
        return []

    def _check_now(self) -> None:
        """``problem()`` before a read: a truncated memmap read would end the process with SIGBUS. A leaf of many
        files (an Arrow dataset's shards) is checked at most once every ``READ_CHECK_S`` seconds: a stat per file
        is a metadata round trip on a network file system, and each epoch start checks every file anyway."""
        now = time.monotonic()
        many = self.__dict__.get("_file_count")
        if many is None:
            many = self._file_count = len(self.files())
        if many > FILES_CHECKED_EVERY_READ and now - self.__dict__.get("_checked_at", -READ_CHECK_S) < READ_CHECK_S:
            return
        problem = self.problem()
        if problem is not None:
            raise DataFileError(problem)
        self._checked_at = now

    def problem(self) -> str | None:
        """Why the files cannot be read as they were when the job started, or None."""
        for path, needed in self.files():
            try:
                size = os.stat(path).st_size
            except OSError as exc:
                return f"the data file {path} ({self.name}) can no longer be read: {exc.strerror or exc}"
            if size < needed:
                return (f"the data file {path} ({self.name}) was truncated while the job ran: it has {size} bytes, "
                        f"the data read in place needs {needed}. Do not shrink or rewrite a file a job reads.")
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, shape={self.shape}, dtype={self.dtype})"


# -- NumPy memmaps ------------------------------------------------------------------------------------------
def _byte_bounds(a: np.ndarray) -> tuple[int, int]:
    utils = getattr(np.lib, "array_utils", None)
    fn = getattr(utils, "byte_bounds", None) or getattr(np, "byte_bounds")
    return fn(a)


def _memmap_owner(a: np.ndarray) -> np.memmap | None:
    """The np.memmap (with a file name) whose mapping ``a``'s memory is part of, if any."""
    base: Any = a
    while isinstance(base, np.ndarray):
        if isinstance(base, np.memmap) and getattr(base, "_mmap", None) is not None and base.filename:
            return base
        base = base.base
    return None


class MemmapArray(DiskArray):
    """An array (or view) of a NumPy memmap: ``np.load(path, mmap_mode="r")`` or ``np.memmap``."""

    def __init__(self, a: np.ndarray, owner: np.memmap, name: str):
        super().__init__(len(a), a.shape[1:], a.dtype, name)
        mapping = owner._mmap
        mapped_at = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
        mapped_from = owner.offset - owner.offset % mmap.ALLOCATIONGRANULARITY   # np.memmap maps from here
        low, high = _byte_bounds(a)
        self.filename = os.path.abspath(owner.filename)
        self.file_offset = mapped_from + (low - mapped_at)      # the file's byte at the array's lowest address
        self.nbytes = high - low
        self.inner_offset = a.ctypes.data - low
        self.strides, self.full_shape = a.strides, a.shape
        self._array: np.ndarray | None = a

    def _arr(self) -> np.ndarray:
        if self._array is None:   # in a process this was pickled into: open the same file
            raw = np.memmap(self.filename, dtype=np.uint8, mode="r", offset=self.file_offset, shape=(self.nbytes,))
            self._array = np.ndarray(self.full_shape, self.dtype, buffer=raw, offset=self.inner_offset,
                                     strides=self.strides)
        return self._array

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _array=None)   # the file's place, never its contents

    def _read_range(self, a: int, b: int) -> np.ndarray:
        return np.array(self._arr()[a:b])

    def _read_sorted(self, ids: np.ndarray) -> np.ndarray:
        return self._arr()[ids]

    def files(self) -> list[tuple[str, int]]:
        return [(self.filename, self.file_offset + self.nbytes)]


# -- tensors backed by files (torch.from_file) --------------------------------------------------------------
def _mapped_file(address: int) -> str | None:
    """The regular file mapped from its first byte at ``address`` in this process (Linux ``/proc/self/maps``):
    what ``torch.from_file(shared=False)`` makes (its storage does not keep the file name)."""
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                fields = line.split(maxsplit=5)
                if len(fields) < 6:
                    continue
                lo, hi = (int(v, 16) for v in fields[0].split("-"))
                if lo <= address < hi:
                    path = fields[5].strip()
                    at = int(fields[2], 16) + (address - lo)
                    if at == 0 and path.startswith("/") and not path.startswith("/dev/") \
                            and not path.endswith("(deleted)") and os.path.isfile(path):
                        return path
                    return None
    except OSError:
        return None
    return None


def _storage_file(t: torch.Tensor) -> str | None:
    storage = t.untyped_storage()
    name = getattr(storage, "filename", None)    # torch.from_file(shared=True)
    if name:
        return name
    return _mapped_file(storage.data_ptr()) if storage.nbytes() and sys.platform.startswith("linux") else None


class FileTensor(DiskArray):
    """A CPU tensor whose storage is a mapped file (``torch.from_file``)."""

    def __init__(self, t: torch.Tensor, filename: str, name: str):
        np_dtype = torch.empty(0, dtype=t.dtype).numpy().dtype if t.dtype != torch.bfloat16 else np.dtype("f4")
        super().__init__(len(t), tuple(t.shape[1:]), np_dtype, name)
        storage = t.untyped_storage()
        self.filename = os.path.abspath(filename)
        self.storage_bytes = storage.nbytes()
        self.torch_dtype, self.full_shape = t.dtype, tuple(t.shape)
        self.stride, self.storage_offset = t.stride(), t.storage_offset()
        self._tensor_ref: torch.Tensor | None = t.detach()

    def _t(self) -> torch.Tensor:
        if self._tensor_ref is None:
            itemsize = torch.empty(0, dtype=self.torch_dtype).element_size()
            flat = torch.from_file(self.filename, shared=False, size=self.storage_bytes // itemsize,
                                   dtype=self.torch_dtype)
            self._tensor_ref = flat.as_strided(self.full_shape, self.stride, self.storage_offset)
        return self._tensor_ref

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _tensor_ref=None)

    def _read_range(self, a: int, b: int) -> torch.Tensor:
        return self._t()[a:b].clone()

    def _read_sorted(self, ids: np.ndarray) -> torch.Tensor:
        return self._t().index_select(0, torch.from_numpy(ids))

    def files(self) -> list[tuple[str, int]]:
        return [(self.filename, self.storage_bytes)]


# -- h5py datasets ----------------------------------------------------------------------------------------------
class H5Array(DiskArray):
    """An ``h5py.Dataset``; every process opens the file itself (read-only), so nothing is pickled but its name."""

    def __init__(self, ds: Any, name: str):
        super().__init__(ds.shape[0], ds.shape[1:], ds.dtype, name)
        self.filename, self.dataset_name = os.path.abspath(ds.file.filename), ds.name
        self.file_size = os.stat(self.filename).st_size
        self._ds, self._pid = ds, os.getpid()

    def _dataset(self) -> Any:
        if self._ds is None or self._pid != os.getpid():   # pickled, or inherited by a forked worker
            import h5py

            self._ds = h5py.File(self.filename, "r")[self.dataset_name]
            self._pid = os.getpid()
        return self._ds

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _ds=None)

    def _read_range(self, a: int, b: int) -> np.ndarray:
        return self._dataset()[a:b]

    def _read_sorted(self, ids: np.ndarray) -> np.ndarray:
        return self._dataset()[ids]          # h5py's fancy indexing: increasing ids, one selection

    def files(self) -> list[tuple[str, int]]:
        return [(self.filename, self.file_size)]


# -- Arrow columns of a Hugging Face datasets.Dataset -----------------------------------------------------------
def _arrow_to_numpy(column: Any, name: str) -> np.ndarray:
    """An Arrow column of numbers, or of (nested) equal-length lists of numbers, as an n-d NumPy array."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    shape = [len(arr)]
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        if arr.null_count:
            raise ValueError(f"{name}: the column has missing values")
        lengths = np.asarray(arr.value_lengths().to_numpy(zero_copy_only=False))
        if len(lengths) and (lengths != lengths[0]).any():
            raise ValueError(f"{name}: rows of different lengths cannot be stacked into a tensor")
        shape.append(int(lengths[0]) if len(lengths) else 0)
        arr = arr.flatten()
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type)):
        raise TypeError(f"{name}: unsupported column type {arr.type}; expected numbers (or lists of numbers)")
    if arr.null_count:
        raise ValueError(f"{name}: the column has missing values")
    return np.asarray(arr.to_numpy(zero_copy_only=False)).reshape(shape)


class ArrowColumns(DiskArray):
    """One column, or several side by side, of a Hugging Face ``datasets.Dataset`` (Arrow, memory-mapped)."""

    def __init__(self, dataset: Any, names: list[str], stack: bool, name: str):
        self._ds = dataset.select_columns(names).with_format("arrow")   # a view of the same table
        self.names, self.stack, self.name = list(names), stack, name
        head = self._numpy(self._ds[0:1])
        super().__init__(len(dataset), head.shape[1:], head.dtype, name)
        self._files = [(os.path.abspath(f["filename"]), os.stat(f["filename"]).st_size)
                       for f in getattr(dataset, "cache_files", [])]

    def _numpy(self, table: Any) -> np.ndarray:
        cols = [_arrow_to_numpy(table.column(c), f"{self.name} column {c!r}") for c in self.names]
        if not self.stack:
            return cols[0]
        if len({c.shape[1:] for c in cols if c.ndim > 1}) > 1 or (any(c.ndim > 2 for c in cols) and len(cols) > 1):
            raise ValueError(f"{self.name}: columns {self.names} cannot be put side by side (shapes "
                             f"{[c.shape[1:] for c in cols]}); name them separately (a dict or tuple)")
        return np.concatenate([c.reshape(len(c), -1) for c in cols], axis=1)

    def _read_range(self, a: int, b: int) -> np.ndarray:
        return self._numpy(self._ds[a:b])

    def _read_sorted(self, ids: np.ndarray) -> np.ndarray:
        return self._numpy(self._ds[ids.tolist()])      # one gather of the Arrow table

    def files(self) -> list[tuple[str, int]]:
        return self._files


def _is_hf_dataset(v: Any) -> bool:
    mod = sys.modules.get("datasets")
    return mod is not None and isinstance(v, getattr(mod, "Dataset", ()))


class Columns:
    """A Hugging Face ``datasets.Dataset`` with its input, target and sample-weight columns named: pass it as ``x``
    (with ``y=None``) or as ``validation_data``. Made by ``dfit.data.columns``."""

    def __init__(self, dataset: Any, x: Any, y: Any = None, sample_weight: str | None = None):
        if not _is_hf_dataset(dataset):
            raise TypeError(f"columns() takes a Hugging Face datasets.Dataset; got {type(dataset).__name__}")
        self.dataset = dataset
        available = list(dataset.column_names)

        def leaf(spec: Any, what: str) -> DiskArray:
            names = [spec] if isinstance(spec, str) else list(spec)
            if not names or not all(isinstance(c, str) for c in names):
                raise TypeError(f"columns(): {what} must name columns (a str or a list of str); got {spec!r}")
            missing = [c for c in names if c not in available]
            if missing:
                raise ValueError(f"columns(): {what} names {missing}, which the dataset does not have; it has "
                                 f"{available}")
            return ArrowColumns(dataset, names, stack=not isinstance(spec, str), name=f"{what} {spec!r}")

        def structure(spec: Any, what: str) -> Any:
            if isinstance(spec, dict):
                return {k: leaf(v, f"{what}[{k!r}]") for k, v in spec.items()}
            if isinstance(spec, tuple):
                return [leaf(v, f"{what}[{i}]") for i, v in enumerate(spec)]
            return leaf(spec, what)

        if x is None:
            raise ValueError("columns(): x must name the input column(s)")
        self.x = structure(x, "x")
        self.y = None if y is None else structure(y, "y")
        if sample_weight is not None and not isinstance(sample_weight, str):
            raise TypeError(f"columns(): sample_weight names one column; got {sample_weight!r}")
        self.sample_weight = None if sample_weight is None else leaf(sample_weight, "sample_weight")

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"Columns(x={self.x!r}, y={self.y!r}, sample_weight={self.sample_weight!r})"


def columns(dataset: Any, x: Any, y: Any = None, sample_weight: str | None = None) -> Columns:
    """Name the input, target and sample-weight columns of a Hugging Face ``datasets.Dataset``, read in place.

    ``x`` / ``y``: a column name (that column, any numeric shape), a list of names (the columns side by side, as
    ``df[["a", "b"]]``: shape ``(n, k)``), a tuple of those (positional inputs, ``module(*xs)``) or a dict of
    those (named inputs ``module(**xs)``, or named outputs). ``sample_weight``: one column name.
    ``model.fit(dfit.data.columns(ds, x=["f1", "f2"], y="label"), epochs=3)``."""
    return Columns(dataset, x, y, sample_weight)


# -- finding what is read in place --------------------------------------------------------------------------
def in_place(v: Any, name: str = "x") -> DiskArray | None:
    """``v`` as a leaf read in place, when it lives in a file (else None: it is read into memory)."""
    if isinstance(v, DiskArray):
        return v
    if isinstance(v, np.ndarray):
        owner = _memmap_owner(v)
        if owner is None or v.ndim == 0:
            return None
        _numeric(v.dtype, name)
        return MemmapArray(v, owner, name)
    if isinstance(v, torch.Tensor):
        if v.device.type != "cpu" or v.dim() == 0 or v.requires_grad:
            return None
        filename = _storage_file(v)
        return FileTensor(v, filename, name) if filename else None
    h5py = sys.modules.get("h5py")
    if h5py is not None and isinstance(v, h5py.Dataset):
        if v.ndim == 0:
            raise ValueError(f"{name}: expected an array with a first (samples) axis, got a scalar")
        _numeric(v.dtype, name)
        return H5Array(v, name)
    if _is_hf_dataset(v):
        raise TypeError(f"{name}: a Hugging Face datasets.Dataset needs its columns named: pass "
                        "dfit.data.columns(ds, x=..., y=...) as x (with y=None)")
    return None


def disk_leaves(*structures: Any) -> list[DiskArray]:
    return [leaf for s in structures if s is not None for leaf in flatten(s) if isinstance(leaf, DiskArray)]


def read_rows(s: Any, rows: slice | torch.Tensor) -> Any:
    """Rows ``rows`` of every leaf as tensors: in-memory tensors indexed, leaves read in place read."""
    def one(t: Any) -> Any:
        if isinstance(t, DiskArray):
            return t.read(rows)
        return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)

    return one(s) if not isinstance(s, (dict, list, tuple)) else map_structure(one, s)


def materialize(t: Any) -> Any:
    """A leaf read in place as an in-memory tensor (whole); anything else as it is."""
    return t.read_all() if isinstance(t, DiskArray) else t


def check_files(leaves: Iterable[DiskArray], rank: int, world: int) -> None:
    """Every rank checks its files' sizes and they agree (one tiny all-reduce): a file truncated on any rank stops
    every rank with a ``DataFileError``, before the epoch's first step."""
    leaves = list(leaves)
    problem = next((p for p in (leaf.problem() for leaf in leaves) if p is not None), None)
    failed = [rank] if problem is not None else []
    if world > 1:
        flags = dist.all_gather_tensor(torch.tensor([1.0 if problem is not None else 0.0]))
        failed = [r for r in range(world) if flags[r, 0].item() > 0]
    if problem is not None:
        raise DataFileError(f"rank {rank}: {problem}")
    if failed:
        paths = sorted({path for leaf in leaves for path, _ in leaf.files()})
        raise DataFileError(f"rank {rank}: a data file read in place ({', '.join(paths)}) was found truncated or "
                            f"gone on rank(s) {failed}; every rank stops. Do not shrink or rewrite a file a job reads.")
