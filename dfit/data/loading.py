"""Loading a map-style Dataset through torch's ``DataLoader`` with dfit's exact per-rank batch sampler.

Every map-style input (a ``Dataset``, or a user's ``DataLoader`` over one) is read by a ``DataLoader`` whose batch
sampler yields, at each step of an epoch, exactly the rows ``sharding.epoch_rows`` gives this rank. So the batches,
and hence the results, never depend on the number of loader workers nor on the number of ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, default_collate

from .sharding import batches_per_pass, epoch_batches, epoch_rows
from .structure import map_structure

# Options of a user's DataLoader that a resharded loader keeps (the sampler, batch_size, shuffle and drop_last are
# turned into dfit's; the generator is replaced by one seeded from (seed, epoch, rank)).
_KEPT = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
         "prefetch_factor", "persistent_workers", "pin_memory_device")


@dataclass(frozen=True)
class LoadOptions:
    """How a map-style dataset is read: torch ``DataLoader`` options other than the sampler."""

    num_workers: int = 0
    collate_fn: Callable[[list], Any] | None = None
    pin_memory: bool = False
    timeout: float = 0
    worker_init_fn: Callable[[int], Any] | None = None
    multiprocessing_context: Any = None
    prefetch_factor: int | None = None
    persistent_workers: bool = False
    pin_memory_device: str = ""

    @classmethod
    def from_fit(cls, workers: int = 0, max_queue_size: int = 10) -> "LoadOptions":
        """``workers`` processes, at most ``max_queue_size`` batches loaded ahead (pinned memory on CUDA)."""
        if workers == 0:
            return cls(pin_memory=torch.cuda.is_available())
        return cls(num_workers=workers, pin_memory=torch.cuda.is_available(),
                   prefetch_factor=max(1, math.ceil(max_queue_size / workers)))

    @classmethod
    def from_loader(cls, loader: DataLoader) -> "LoadOptions":
        options = cls(**{name: getattr(loader, name) for name in _KEPT})
        if options.collate_fn is default_collate:
            options = replace(options, collate_fn=None)
        return options


def check_loading_arguments(workers: Any, use_multiprocessing: Any, max_queue_size: Any) -> None:
    """``workers``, ``use_multiprocessing`` and ``max_queue_size`` of fit/evaluate/predict (before any collective).

    dfit's workers are always processes (torch's DataLoader has no thread workers), so ``use_multiprocessing=True``
    only restates that and needs ``workers > 0``; with ``workers > 0``, ``use_multiprocessing=False`` does not
    make threads (documented in the reference).
    """
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
        raise ValueError(f"workers must be a non-negative integer; got {workers!r}")
    if not isinstance(use_multiprocessing, (bool, np.bool_)):
        raise TypeError(f"use_multiprocessing must be True or False; got {use_multiprocessing!r}")
    if use_multiprocessing and workers == 0:
        raise ValueError("use_multiprocessing=True needs workers > 0 (the number of loader processes); dfit's "
                         "workers are always processes, so use_multiprocessing can stay False")
    if isinstance(max_queue_size, bool) or not isinstance(max_queue_size, (int, np.integer)) or max_queue_size < 1:
        raise ValueError(f"max_queue_size must be a positive integer; got {max_queue_size!r}")


@dataclass(frozen=True)
class LoaderSettings:
    """What a user's ``DataLoader`` says about batching, turned into dfit's terms."""

    options: LoadOptions
    batch_size: int
    shuffle: bool
    drop_last: bool


def loader_settings(loader: DataLoader) -> LoaderSettings:
    """Read a user's loader over a map-style dataset; a clear error for what cannot be resharded exactly."""
    supported = ("supported: DataLoader(dataset, batch_size=B, shuffle=True/False, drop_last=...), i.e. its "
                 "default SequentialSampler or RandomSampler; dfit replaces the sampler by its own, exact on N ranks")
    if loader.batch_size is None:
        what = "a custom batch_sampler" if loader.batch_sampler is not None else "batch_size=None (no batching)"
        raise ValueError(f"a DataLoader with {what} cannot be resharded over ranks; {supported}")
    if type(loader.batch_sampler) is not BatchSampler or loader.batch_sampler.sampler is not loader.sampler:
        raise ValueError(f"a DataLoader with a custom batch_sampler cannot be resharded over ranks; {supported}")
    sampler = loader.sampler
    if type(sampler) is RandomSampler:
        if sampler.replacement or sampler._num_samples is not None:
            raise ValueError("a DataLoader whose RandomSampler draws with replacement or a number of samples other "
                             f"than len(dataset) cannot be resharded over ranks; {supported}")
        shuffle = True
    elif type(sampler) is SequentialSampler:
        shuffle = False
    else:
        raise ValueError(f"a DataLoader with sampler {type(sampler).__name__} cannot be resharded over ranks; "
                         f"{supported}")
    if not getattr(loader, "in_order", True):
        raise ValueError("a DataLoader with in_order=False gives batches in an order that depends on worker timing; "
                         "dfit needs in_order=True (the default) to give the same result on any number of ranks")
    return LoaderSettings(LoadOptions.from_loader(loader), int(loader.batch_size), shuffle, bool(loader.drop_last))


class Collate:
    """Items to ``(x, y, sample_weight, rows)``, floats cast; runs in the loader's workers (so it pickles).

    Items that are tuples of two or three are ``(x, y[, sample_weight])``; anything else is ``x``. With a user's
    ``collate_fn`` whose items are not such tuples, a batch that is a tuple of two or three is ``(x, y[, w])``.
    An empty list of items (this rank has no rows of a small last batch) gives ``None``.
    """

    def __init__(self, collate_fn: Callable[[list], Any] | None, float_dtype: torch.dtype | None):
        self.collate_fn, self.float_dtype = collate_fn, float_dtype

    def _cast(self, t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and self.float_dtype and t.dtype != self.float_dtype:
            return t.to(self.float_dtype)
        return t

    def __call__(self, items: list) -> tuple | None:
        if not items:
            return None
        batch = (self.collate_fn or default_collate)(items)
        arity = len(items[0]) if isinstance(items[0], tuple) and len(items[0]) in (2, 3) else 0
        if not arity and self.collate_fn is not None and isinstance(batch, tuple) and len(batch) in (2, 3):
            arity = len(batch)
        if arity:
            if not isinstance(batch, (list, tuple)) or len(batch) != arity:
                raise TypeError(f"the collate_fn turned items of {arity} parts (x, y[, sample_weight]) into a "
                                f"{type(batch).__name__}; it must return {arity} parts too")
            x, y = map_structure(self._cast, batch[0]), map_structure(self._cast, batch[1])
            w = self._cast(batch[2]) if arity == 3 else None
            return x, y, w, len(items)
        return map_structure(self._cast, batch), None, None, len(items)


class RankBatchSampler:
    """For each step of the current epoch, this rank's row ids of the global batch (``[]`` where it has none),
    computed as the loader asks for them (nothing per pass is built).

    ``set_epoch`` chooses the epoch before ``iter(loader)``; a persistent loader re-reads it at each new iterator.
    """

    def __init__(self, row_ids: range, rank: int, world: int, drop_last: bool):
        self.row_ids, self.rank, self.world, self.drop_last = row_ids, rank, world, drop_last
        self._epoch: tuple[int, int, int | None, bool, int] | None = None

    def set_epoch(self, epoch: int, batch_size: int, steps: int | None, shuffle: bool, seed: int) -> None:
        self._epoch = (epoch, batch_size, steps, shuffle, seed)

    def _rows(self, shuffle: bool) -> Iterator[tuple[slice | Any, int]]:
        if self._epoch is None:
            return iter(())
        epoch, batch_size, steps, _, seed = self._epoch
        return epoch_rows(len(self.row_ids), batch_size, epoch, steps, shuffle, seed, self.rank, self.world,
                          drop_last=self.drop_last)

    def global_sizes(self) -> Iterator[int]:
        """The global batch size of each step of the epoch (arithmetic only: no rows are computed)."""
        return (size for _, size in self._rows(shuffle=False))

    def __iter__(self) -> Iterator[list[int]]:
        ids, n = self.row_ids, len(self.row_ids)
        for rows, _ in self._rows(shuffle=bool(self._epoch and self._epoch[3])):
            local = range(n)[rows] if isinstance(rows, slice) else rows.tolist()
            yield [ids[i] for i in local]

    def __len__(self) -> int:
        if self._epoch is None:
            return 0
        epoch, batch_size, steps, _, _ = self._epoch
        return len(epoch_batches(batches_per_pass(len(self.row_ids), batch_size, self.drop_last), epoch, steps)[1])


def name_the_rank(exc: BaseException, rank: int, world: int) -> None:
    """Say in the message of an exception raised while loading which rank it came from."""
    where = f"[rank {rank} of {world}, loading data] "
    if len(exc.args) == 1 and isinstance(exc.args[0], str):
        message = exc.args[0]
        try:  # keep a str subclass (torch's KeyErrorMessage keeps a KeyError's traceback readable)
            exc.args = (type(message)(where + message),)
        except Exception:  # noqa: BLE001 - a str subclass with another constructor
            exc.args = (where + message,)
        if where.strip() in str(exc):
            return
    if hasattr(exc, "add_note"):   # Python >= 3.11
        exc.add_note(where.strip())
