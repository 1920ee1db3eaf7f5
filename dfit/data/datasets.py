"""Map-style ``torch.utils.data.Dataset`` (alone or inside a user's ``DataLoader``): data of known length.

Read through torch's ``DataLoader`` (in the training process with ``workers=0``, on worker processes otherwise)
whose batch sampler gives each rank only its rows of each global batch, so each rank fetches only its own items.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .arrays import Batch
from .loading import Collate, LoadOptions, RankBatchSampler, name_the_rank
from .sharding import batches_per_pass, split_point
from .structure import map_structure


def _no_rows(s):
    return map_structure(lambda t: t[:0] if isinstance(t, torch.Tensor) else t, s)


class DatasetData:
    """Items ``(x, y)``, ``(x, y, sample_weight)`` or ``x``; each rank fetches only its own rows.

    ``options`` are the ``DataLoader`` options (workers, collate_fn, ...). A user's loader also brings its
    ``batch_size`` (the default global batch), whether it shuffles (``shuffle=False`` never shuffles, whatever
    ``fit`` says) and ``drop_last`` (the partial last global batch of each pass is left out).
    """

    sample_weight = None  # weights, if any, come with the items

    def __init__(self, dataset: Dataset, float_dtype: torch.dtype | None, rows: range | None = None, *,
                 options: LoadOptions = LoadOptions(), batch_size: int | None = None, shuffle: bool = True,
                 drop_last: bool = False):
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError as exc:
            raise TypeError("a map-style Dataset must define __len__") from exc
        self.dataset, self.float_dtype = dataset, float_dtype
        self.row_ids = rows if rows is not None else range(n)
        self.n = len(self.row_ids)
        if self.n == 0:
            raise ValueError("Empty input: the Dataset has 0 samples")
        self.options, self.batch_size, self.shuffle, self.drop_last = options, batch_size, shuffle, drop_last
        self.collate = Collate(options.collate_fn, float_dtype)
        self._loader: DataLoader | None = None
        self._loader_key: tuple[int, int] | None = None
        self._live = None  # the iterator of the epoch being read, shut down by close()
        self._empty: Batch | None = None

    @property
    def y(self):
        """The targets of the first item as a one-row batch (None for ``x``-only items): names the outputs."""
        if not hasattr(self, "_y_example"):
            self._y_example = self.collate([self.dataset[self.row_ids[0]]])[1]
        return self._y_example

    def with_weights(self, sample_weight):
        raise NotImplementedError(
            "class_weight is not supported for a Dataset input; make its items (x, y, sample_weight) "
            "with the class weights folded into sample_weight, or pass arrays"
        )

    def split(self, validation_split: float) -> tuple["DatasetData", "DatasetData"]:
        n_train = split_point(self.n, validation_split)
        return self._with_rows(self.row_ids[:n_train]), self._with_rows(self.row_ids[n_train:])

    def _with_rows(self, rows: range) -> "DatasetData":
        return DatasetData(self.dataset, self.float_dtype, rows, options=self.options, batch_size=self.batch_size,
                           shuffle=self.shuffle, drop_last=self.drop_last)

    def steps_per_pass(self, batch_size: int) -> int:
        steps = batches_per_pass(self.n, batch_size, self.drop_last)
        if steps == 0:
            raise ValueError(f"the DataLoader has drop_last=True and its {self.n} rows are fewer than the global "
                             f"batch size {batch_size}: no batch is left; use a smaller batch_size or drop_last=False")
        return steps

    # -- reading ------------------------------------------------------------------------------------------
    def epoch(self, epoch: int, batch_size: int, steps: int | None, shuffle: bool, seed: int,
              rank: int, world: int) -> Iterator[Batch]:
        """This rank's part of each global batch of ``epoch``, in order, whatever the number of workers."""
        self.steps_per_pass(batch_size)
        loader = self._loader_for(rank, world)
        sampler: RankBatchSampler = loader.batch_sampler  # type: ignore[assignment]
        sampler.set_epoch(epoch, batch_size, steps, shuffle and self.shuffle, seed)
        global_sizes = sampler.global_sizes()
        if hasattr(self.dataset, "set_epoch"):  # e.g. augmentation seeded by (item, epoch); before workers start
            self.dataset.set_epoch(epoch)
        loader.generator.manual_seed(int(np.random.default_rng([seed & 0xFFFFFFFF, epoch, rank]).integers(2 ** 62)))
        finished = False
        try:
            self._live = iter(loader)
            for out, global_size in zip(self._live, global_sizes):
                yield self._empty_batch(global_size) if out is None else Batch(*out, global_size)
            finished = True
        except Exception as exc:
            name_the_rank(exc, rank, world)
            raise
        finally:
            if not (finished and loader.persistent_workers):
                self.close()

    def _loader_for(self, rank: int, world: int) -> DataLoader:
        if self._loader is not None and self._loader_key == (rank, world):
            return self._loader
        self.close()
        o = self.options
        extra = {"prefetch_factor": o.prefetch_factor} if o.num_workers else {}
        self._loader = DataLoader(
            self.dataset, batch_sampler=RankBatchSampler(self.row_ids, rank, world, self.drop_last),
            num_workers=o.num_workers, collate_fn=self.collate, pin_memory=o.pin_memory, timeout=o.timeout,
            worker_init_fn=o.worker_init_fn, multiprocessing_context=o.multiprocessing_context,
            generator=torch.Generator(), persistent_workers=o.persistent_workers and o.num_workers > 0,
            pin_memory_device=o.pin_memory_device, **extra)
        self._loader_key = (rank, world)
        return self._loader

    def _empty_batch(self, global_size: int) -> Batch:
        """This rank has no rows of a small last batch: a 0-row batch of the right shape (one item read once)."""
        if self._empty is None:
            x, y, w, _ = self.collate([self.dataset[self.row_ids[0]]])
            self._empty = Batch(_no_rows(x), _no_rows(y), None if w is None else w[:0], 0, 0)
        return self._empty._replace(global_size=global_size)

    def close(self) -> None:
        """Shut down the loader's worker processes, if any (idempotent)."""
        live, loader = self._live, self._loader
        self._live = None
        if loader is not None and loader.persistent_workers:
            live = live or getattr(loader, "_iterator", None)
            loader._iterator = None
            self._loader = None
        shutdown = getattr(live, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
