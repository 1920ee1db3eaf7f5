"""Thousands of ranks and a billion rows, by simulation: the sharding plan is pure arithmetic plus ``shuffle.perm``,
so every rank of a world of up to 4096 can be computed in one process.

Checked for world sizes 1..4096 and n up to 1e9: every row is read exactly once per pass, the parts of a global batch
differ by at most one row and together are exactly the batch, and a rank's work per step is its part, whatever n or
the world size."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dfit.data import sharding as S
from dfit.data.shuffle import perm

WORLDS = [1, 2, 3, 7, 64, 1000, 4096]
RNG = np.random.default_rng(2026)


def _plans(n, batch_size, world, shuffle=True, seed=17, pass_index=0):
    return [S.GlobalBatchPlan(n, batch_size, rank, world, shuffle, seed, pass_index) for rank in range(world)]


def _ranks_to_compute(world):
    """Every rank up to 64; beyond, the first, last and a few in between (the positions of ALL ranks are still
    checked, and a rank's rows are a function of its positions only)."""
    if world <= 64:
        return range(world)
    return sorted({0, 1, 2, world // 3, world // 2, world - 3, world - 2, world - 1})


def _check_step(plans, step):
    """One global batch over all ranks: the parts tile the batch's positions in rank order, their sizes differ by
    at most one, every rank reports the same global size, and each rank's rows are the pass's shuffle at its
    positions (the batch's rows computed in one call, cut at the rank's bounds). Returns the batch's rows."""
    p = plans[0]
    first = step * p.batch_size
    size = min(p.batch_size, p.n - first)
    bounds = [plan.positions(step) for plan in plans]
    assert {global_size for _, _, global_size in bounds} == {size}
    lengths = [hi - lo for lo, hi, _ in bounds]
    assert sum(lengths) == size and max(lengths) - min(lengths) <= 1
    assert lengths == sorted(lengths, reverse=True)                     # the extra rows go to the first ranks
    assert bounds[0][0] == first and bounds[-1][1] == first + size
    assert all(bounds[r][1] == bounds[r + 1][0] for r in range(len(plans) - 1))
    batch = perm(torch.arange(first, first + size), p.n, p.seed, p.pass_index)
    for r in _ranks_to_compute(len(plans)):
        rows, global_size = plans[r].rows(step)
        lo, hi, _ = bounds[r]
        assert global_size == size and torch.equal(rows, batch[lo - first:hi - first])
    return batch


@pytest.mark.parametrize("world", WORLDS)
def test_small_n_every_row_exactly_once_per_pass_on_any_world(world):
    for n, batch_size in [(1, 1), (37, 5), (300, 64), (4097, 1000)]:
        for pass_index in (0, 3):
            plans = _plans(n, batch_size, world, pass_index=pass_index)
            rows = torch.cat([_check_step(plans, step) for step in range(S.num_batches(n, batch_size))])
            assert sorted(rows.tolist()) == list(range(n))
    # and the pass through epoch_rows, as the adapters read it, with epochs of 2 steps and a resumed epoch
    n, batch_size, steps = 4097, 1000, 2
    plans = _plans(n, batch_size, world)
    for epoch in range(3):                                                  # 5 batches a pass: epochs of 2, 2, 1
        for r in _ranks_to_compute(world):
            got = list(S.epoch_rows(n, batch_size, epoch, steps, True, 17, r, world))
            want = [plans[r].rows(step) for step in S.epoch_batches(5, epoch, steps)[1]]
            assert [size for _, size in got] == [size for _, size in want]
            assert all(torch.equal(g, w) for (g, _), (w, _) in zip(got, want))
            resumed = list(S.epoch_rows(n, batch_size, epoch, steps, True, 17, r, world, start=1))
            assert len(resumed) == len(got) - 1
            assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, got[1:]))


def test_unshuffled_small_n_is_slices_tiling_the_pass():
    for world in WORLDS:
        n, batch_size = 5000, 1024
        plans = _plans(n, batch_size, world, shuffle=False)
        seen = np.zeros(n, dtype=np.int64)
        for step in range(S.num_batches(n, batch_size)):
            for plan in plans:
                rows, _ = plan.rows(step)
                assert isinstance(rows, slice)
                seen[rows] += 1
        assert (seen == 1).all()


@pytest.mark.parametrize("world", WORLDS + [int(w) for w in RNG.integers(1, 4097, size=3)])
def test_a_billion_rows_sampled_steps_and_passes(world):
    rng = np.random.default_rng(world)                                     # the same draws in any test order
    n = 10 ** 9 + int(rng.integers(0, 10 ** 6))
    batch_size = int(rng.choice([world, 4096, 65536, 3 * world + 1]))
    full = n // batch_size
    steps = {0, full - 1, full, *rng.integers(0, full, size=2).tolist()}   # first, last full, partial, random
    for pass_index in {0, int(rng.integers(1, 2 ** 32))}:
        plans = _plans(n, batch_size, world, seed=int(rng.integers(0, 2 ** 31)), pass_index=pass_index)
        rows = torch.cat([_check_step(plans, step) for step in sorted(steps)])
        assert len(torch.unique(rows)) == len(rows)                          # no row twice across the sampled steps
        assert int(rows.min()) >= 0 and int(rows.max()) < n


@pytest.mark.parametrize("world", WORLDS)
def test_the_positions_tile_every_pass_exactly(world):
    """Every position of the pass belongs to exactly one (step, rank), for n up to 1e9: pure arithmetic, checked
    over all steps from the plans' bounds (the rows are then a bijection of the positions, see test_shuffle)."""
    for n, batch_size in [(10 ** 9 + 7, 10 ** 7 + 1), (10 ** 6 + 3, 4096), (12345, 999)]:
        plans = _plans(n, batch_size, world)
        sample = plans if world <= 64 else [plans[r] for r in (0, 1, world // 2, world - 2, world - 1)]
        covered = 0
        for step in range(S.num_batches(n, batch_size)):
            lo0 = plans[0].positions(step)[0]
            hi_last = plans[-1].positions(step)[1]
            assert lo0 == covered
            covered = hi_last
            for plan in sample[1:]:                                         # each part starts where the last ended
                assert plan.positions(step)[0] == plans[plan.rank - 1].positions(step)[1]
        assert covered == n


class _CountingPerm:
    """Wraps ``perm``: how many calls, how many positions in all, the largest call."""

    def __init__(self):
        self.calls, self.positions, self.largest = 0, 0, 0

    def __call__(self, positions, n, seed, pass_index):
        self.calls += 1
        self.positions += len(positions)
        self.largest = max(self.largest, len(positions))
        return perm(positions, n, seed, pass_index)


@pytest.mark.parametrize("n", [10 ** 3 + 1, 10 ** 6 + 1, 10 ** 9 + 1])
@pytest.mark.parametrize("world", [1, 7, 4096])
def test_a_ranks_work_per_step_is_its_part_whatever_n_and_world(n, world, monkeypatch):
    counting = _CountingPerm()
    monkeypatch.setattr(S, "perm", counting)
    batch_size = 512
    rank = world // 2
    plan = S.GlobalBatchPlan(n, batch_size, rank, world, True, 3, 5)
    assert counting.calls == 0                                              # no setup per pass
    part = len(plan.rows(0)[0])
    assert (counting.calls, counting.positions) == (1, part)
    assert part == S.part_bounds(batch_size, world, rank)[1] - S.part_bounds(batch_size, world, rank)[0]
    # a whole epoch of 300 steps (or the pass, if shorter): exactly the rows read, in calls of bounded size
    counting.__init__()
    steps = 300
    read = sum(len(rows) for rows, _ in S.epoch_rows(n, batch_size, 0, steps, True, 3, rank, world))
    assert counting.positions == read
    assert counting.largest <= S.ROWS_PER_CALL + part


def test_partial_last_batch_smaller_than_the_world():
    n, batch_size, world = 4096 * 244_141 + 3, 4096, 4096                 # the last batch has 3 rows for 4096 ranks
    plans = _plans(n, batch_size, world)
    last = S.num_batches(n, batch_size) - 1
    rows = _check_step(plans, last)
    assert len(rows) == 3 and [len(p.rows(last)[0]) for p in plans[:4]] == [1, 1, 1, 0]
