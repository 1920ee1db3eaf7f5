"""The exact global-batch sharding: the arithmetic that makes N processes equal one.

Data is first cut into GLOBAL batches (from one permutation per pass, the same everywhere), and only
then is each global batch split into ``world_size`` contiguous parts whose sizes differ by at most one
(the first ``n % world`` parts get the extra row). The last, partial batch is kept, never padded.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def part_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s contiguous part when ``n`` rows are split over ``world`` ranks."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def num_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def permutation(n: int, seed: int, pass_index: int) -> torch.Tensor:
    """The shuffle of pass ``pass_index``: a function of (seed, pass) only, identical on every rank."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(pass_index)])
    return torch.from_numpy(rng.permutation(n))


class GlobalBatchPlan:
    """Which rows this rank reads at each global step of a pass over ``n`` rows.

    ``rows(step)`` is a slice (no shuffle: zero-copy views) or an index tensor (shuffle), together with
    the global batch size that losses are normalised by.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int,
                 shuffle: bool, seed: int, pass_index: int):
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.order = permutation(n, seed, pass_index) if shuffle else None
        self.full_steps = n // batch_size
        self._full_part = part_bounds(batch_size, world, rank)

    def rows(self, step: int) -> tuple[slice | torch.Tensor, int]:
        first = step * self.batch_size
        if step < self.full_steps:
            size, (start, stop) = self.batch_size, self._full_part
        else:
            size = self.n - first
            start, stop = part_bounds(size, self.world, self.rank)
        if self.order is None:
            return slice(first + start, first + stop), size
        return self.order[first + start:first + stop], size


def epoch_rows(n: int, batch_size: int, epoch: int, steps: int | None, shuffle: bool, seed: int,
               rank: int, world: int) -> Iterator[tuple[slice | torch.Tensor, int]]:
    """This rank's rows and the global batch size at each step of ``epoch``.

    Without ``steps`` an epoch is one pass (pass index = epoch). With ``steps`` the data repeats,
    reshuffled each pass: global step ``g = epoch * steps + s`` reads batch ``g % batches`` of pass
    ``g // batches``.
    """
    per_pass = num_batches(n, batch_size)
    if steps is None:
        plan = GlobalBatchPlan(n, batch_size, rank, world, shuffle, seed, epoch)
        for step in range(per_pass):
            yield plan.rows(step)
        return
    plan, plan_pass = None, -1
    for g in range(epoch * steps, (epoch + 1) * steps):
        pass_index, step = divmod(g, per_pass)
        if pass_index != plan_pass:
            plan, plan_pass = GlobalBatchPlan(n, batch_size, rank, world, shuffle, seed, pass_index), pass_index
        yield plan.rows(step)


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
