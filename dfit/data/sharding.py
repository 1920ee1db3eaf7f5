"""The exact global-batch sharding: the arithmetic that makes N processes equal one.

Data is first cut into GLOBAL batches (from one permutation per pass, the same everywhere), and only
then is each global batch split into ``world_size`` contiguous parts whose sizes differ by at most one
(the first ``n % world`` parts get the extra row). The last, partial batch is kept, never padded.

The permutation is never built: a rank computes ``shuffle.perm`` at the positions of its own parts only
(``first + start .. first + stop`` of each global batch), so a pass costs no setup and O(1) memory.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .shuffle import perm

ROWS_PER_CALL = 1 << 14  # positions computed per call of ``perm`` when a plan walks through many steps


def part_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s contiguous part when ``n`` rows are split over ``world`` ranks."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def num_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


class GlobalBatchPlan:
    """Which rows this rank reads at each global step of a pass over ``n`` rows.

    ``rows(step)`` is a slice (no shuffle: zero-copy views) or an int64 index tensor (shuffle: the pass's
    permutation ``shuffle.perm`` at this rank's positions of the global batch), together with the global batch
    size that losses are normalised by. Nothing is computed per pass; ``rows_of`` computes many steps' rows in
    a few vectorised calls.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int,
                 shuffle: bool, seed: int, pass_index: int):
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.shuffle, self.seed, self.pass_index = shuffle, seed, pass_index
        self.full_steps = n // batch_size
        self._full_part = part_bounds(batch_size, world, rank)

    def positions(self, step: int) -> tuple[int, int, int]:
        """``(lo, hi, size)``: this rank's positions ``[lo, hi)`` in the pass, and the global batch size."""
        first = step * self.batch_size
        if step < self.full_steps:
            size, (start, stop) = self.batch_size, self._full_part
        else:
            size = self.n - first
            start, stop = part_bounds(size, self.world, self.rank)
        return first + start, first + stop, size

    def rows(self, step: int) -> tuple[slice | torch.Tensor, int]:
        lo, hi, size = self.positions(step)
        if not self.shuffle:
            return slice(lo, hi), size
        return perm(torch.arange(lo, hi), self.n, self.seed, self.pass_index), size

    def rows_of(self, steps: range) -> Iterator[tuple[slice | torch.Tensor, int]]:
        """``rows(step)`` for each of ``steps`` in order; shuffled full steps are computed ``ROWS_PER_CALL``
        positions at a time (the cost of a call of ``perm`` is mostly fixed below a few thousand rows)."""
        if not self.shuffle:
            yield from (self.rows(step) for step in steps)
            return
        start, stop = self._full_part
        per_call = max(1, ROWS_PER_CALL // max(1, stop - start))
        full = range(steps.start, min(steps.stop, self.full_steps), steps.step) if steps.step == 1 else range(0)
        for i in range(0, len(full), per_call):
            chunk = np.asarray(full[i:i + per_call], dtype=np.int64)
            where = (chunk[:, None] * self.batch_size + np.arange(start, stop, dtype=np.int64)).ravel()
            rows = torch.from_numpy(perm(where, self.n, self.seed, self.pass_index)).view(len(chunk), stop - start)
            for k in range(len(chunk)):
                yield rows[k], self.batch_size
        yield from (self.rows(step) for step in steps if step not in full)


def epoch_batches(per_pass: int, epoch: int, steps: int | None) -> tuple[int, range]:
    """Keras 3's epochs over data of known length: (pass index, the batches of that pass in ``epoch``).

    Without ``steps`` an epoch is one pass. With ``steps`` smaller than a pass, consecutive epochs continue
    through the pass (epoch 2 starts where epoch 1 stopped) and the epoch that reaches the end of the data stops
    there, shorter; the next epoch starts a new pass, reshuffled. With ``steps`` larger than a pass, every epoch
    is one pass and ends when the data runs out. (Keras warns when an epoch ends before ``steps``.)
    """
    if steps is None or steps >= per_pass:
        return epoch, range(per_pass)
    epochs_per_pass = num_batches(per_pass, steps)
    pass_index, chunk = divmod(epoch, epochs_per_pass)
    return pass_index, range(chunk * steps, min((chunk + 1) * steps, per_pass))


def batches_per_pass(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Global batches in a pass over ``n`` rows (``drop_last``: without the partial last one, as a DataLoader)."""
    return n // batch_size if drop_last else num_batches(n, batch_size)


def epoch_rows(n: int, batch_size: int, epoch: int, steps: int | None, shuffle: bool, seed: int,
               rank: int, world: int, drop_last: bool = False, start: int = 0
               ) -> Iterator[tuple[slice | torch.Tensor, int]]:
    """This rank's rows and the global batch size at each step of ``epoch`` (see ``epoch_batches``), from the
    epoch's step ``start`` on (a resumed epoch).

    ``drop_last`` leaves out the partial last global batch of each pass (a shuffled pass still draws it from all
    ``n`` rows, so which rows are left out changes from pass to pass)."""
    pass_index, batches = epoch_batches(batches_per_pass(n, batch_size, drop_last), epoch, steps)
    plan = GlobalBatchPlan(n, batch_size, rank, world, shuffle, seed, pass_index)
    yield from plan.rows_of(batches[start:])


def batch_size_for(n: int, batch_size: int | None, steps: int | None) -> int:
    """Keras' batch size: the one given, else ``ceil(n / steps)`` when steps are given, else 32."""
    if batch_size is not None:
        return batch_size
    return max(1, num_batches(n, steps)) if steps else 32


def split_point(n: int, validation_split: float) -> int:
    """Keras' split: rows [0, k) train, the LAST ``n - k`` rows (before shuffling) validate."""
    n_train = int(n * (1.0 - validation_split))
    if n_train <= 0 or n_train >= n:
        side = "training" if n_train <= 0 else "validation"
        raise ValueError(
            f"validation_split={validation_split} of {n} samples leaves no {side} samples; "
            "choose a split that leaves at least one sample on each side"
        )
    return n_train
