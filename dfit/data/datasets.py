"""Map-style ``torch.utils.data.Dataset``: treated like an array of known length, read row by row."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, default_collate

from .arrays import Batch
from .sharding import epoch_rows, num_batches, split_point
from .structure import index_rows, map_structure


class DatasetData:
    """Items ``(x, y)``, ``(x, y, sample_weight)`` or ``x``; each rank fetches only its own rows."""

    sample_weight = None  # weights, if any, come with the items

    def __init__(self, dataset: Dataset, float_dtype: torch.dtype | None, rows: range | None = None):
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError as exc:
            raise TypeError("a map-style Dataset must define __len__") from exc
        self.dataset, self.float_dtype = dataset, float_dtype
        self.row_ids = rows if rows is not None else range(n)
        self.n = len(self.row_ids)
        if self.n == 0:
            raise ValueError("Empty input: the Dataset has 0 samples")

    @property
    def y(self):
        """The targets of the first item as a one-row batch (None for ``x``-only items): names the outputs."""
        if not hasattr(self, "_y_example"):
            item = self.dataset[self.row_ids[0]]
            is_pair = isinstance(item, tuple) and len(item) in (2, 3)
            self._y_example = default_collate([item[1]]) if is_pair else None
        return self._y_example

    def with_weights(self, sample_weight):
        raise NotImplementedError(
            "class_weight is not supported for a Dataset input; make its items (x, y, sample_weight) "
            "with the class weights folded into sample_weight, or pass arrays"
        )

    def split(self, validation_split: float) -> tuple["DatasetData", "DatasetData"]:
        n_train = split_point(self.n, validation_split)
        return (DatasetData(self.dataset, self.float_dtype, self.row_ids[:n_train]),
                DatasetData(self.dataset, self.float_dtype, self.row_ids[n_train:]))

    def steps_per_pass(self, batch_size: int) -> int:
        return num_batches(self.n, batch_size)

    def epoch(self, epoch: int, batch_size: int, steps: int | None, shuffle: bool, seed: int,
              rank: int, world: int) -> Iterator[Batch]:
        for rows, global_size in epoch_rows(self.n, batch_size, epoch, steps, shuffle, seed, rank, world):
            ids = range(self.n)[rows] if isinstance(rows, slice) else rows.tolist()
            yield self._collate([self.dataset[self.row_ids[i]] for i in ids], global_size)

    def _collate(self, items: list, global_size: int) -> Batch:
        size = len(items)
        if not items:  # this rank has no rows of a small last batch: an empty batch of the right shape
            items = [self.dataset[self.row_ids[0]]]
        batch = default_collate(items)
        if size == 0:
            batch = index_rows(batch, slice(0, 0)) if not isinstance(batch, list) else [index_rows(b, slice(0, 0)) for b in batch]
        cast = lambda t: t.to(self.float_dtype) if t.is_floating_point() and self.float_dtype else t  # noqa: E731
        if isinstance(items[0], tuple) and len(items[0]) in (2, 3):
            x, y = map_structure(cast, batch[0]), map_structure(cast, batch[1])
            w = cast(batch[2]) if len(items[0]) == 3 else None
            return Batch(x, y, w, size, global_size)
        return Batch(map_structure(cast, batch), None, None, size, global_size)
