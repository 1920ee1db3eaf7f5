"""Properties of ``dfit.data.shuffle.perm``: a bijection of [0, n), keyed by (seed, pass), statistically uniform,
the same bits however the positions are split up (so on every rank and world size)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from dfit.data.shuffle import perm, round_keys
from reference_ddp import shuffled_order


def _is_bijection(n: int, seed: int = 3, pass_index: int = 1) -> bool:
    rows = perm(np.arange(n), n, seed, pass_index)
    return rows.dtype == np.int64 and np.array_equal(np.sort(rows), np.arange(n))


def test_a_bijection_for_every_n_up_to_2000():
    assert [n for n in range(1, 2001) if not _is_bijection(n)] == []


@pytest.mark.parametrize("n", [2 ** k + d for k in (2, 7, 11, 16, 20) for d in (-1, 0, 1)] + [10 ** 6 + 3])
def test_a_bijection_near_powers_of_two_and_at_a_million_and_three(n):
    assert _is_bijection(n, seed=12345, pass_index=9)


def test_zero_rows_and_an_empty_part():
    assert perm(np.arange(0), 0, 1, 0).shape == (0,)
    assert perm(torch.arange(5, 5), 10, 1, 0).dtype == torch.int64


def test_different_for_different_passes_and_seeds():
    n = 50
    by_pass = {tuple(perm(np.arange(n), n, 7, p)) for p in range(200)}
    by_seed = {tuple(perm(np.arange(n), n, s, 0)) for s in range(200)}
    assert len(by_pass) == 200 and len(by_seed) == 200
    assert tuple(perm(np.arange(n), n, 7, 0)) in by_pass & by_seed           # (7, 0) is in both families
    # the seed counts modulo 2**32, as before (negative and large seeds are valid)
    assert np.array_equal(perm(np.arange(n), n, 2 ** 32 + 7, 3), perm(np.arange(n), n, 7, 3))
    assert np.array_equal(perm(np.arange(n), n, -1, 3), perm(np.arange(n), n, 2 ** 32 - 1, 3))
    assert len(set(round_keys(0, 0)) | set(round_keys(0, 1)) | set(round_keys(1, 0))) == 24


def test_the_documented_stream_is_pinned_and_matches_the_reference_written_out_by_hand():
    # A change here changes every shuffled history: treat it as a breaking change (README, docs/reference.md).
    assert perm(np.arange(10), 10, 0, 0).tolist() == [2, 1, 9, 7, 6, 3, 8, 0, 5, 4]
    for n, seed, pass_index in [(1, 0, 0), (2, 5, 0), (2, 5, 1), (3, 1, 4), (43, 5, 2), (1000, -1, 7), (1025, 9, 0)]:
        assert perm(np.arange(n), n, seed, pass_index).tolist() == shuffled_order(n, seed, pass_index)


def test_the_same_bits_however_the_positions_are_split():
    n = 10 ** 9 + 7
    where = np.arange(3 * 10 ** 8, 3 * 10 ** 8 + 4096)
    whole = perm(where, n, 11, 2)
    pieces = np.concatenate([perm(part, n, 11, 2) for part in np.array_split(where, 37)])
    assert np.array_equal(whole, pieces)
    assert np.array_equal(perm(where[::-1].copy(), n, 11, 2), whole[::-1])          # position by position
    assert torch.equal(perm(torch.from_numpy(where), n, 11, 2), torch.from_numpy(whole))
    grid = where.reshape(64, 64)
    assert np.array_equal(perm(grid, n, 11, 2), whole.reshape(64, 64))
    assert np.array_equal(grid.ravel(), where)                                         # the input is untouched
    assert len(np.unique(whole)) == 4096 and whole.min() >= 0 and whole.max() < n


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 10\)"):
        perm(np.array([3, 10]), 10, 0, 0)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 10\)"):
        perm(torch.tensor([-1]), 10, 0, 0)
    with pytest.raises(TypeError, match="positions must be integers"):
        perm(np.array([0.0, 1.0]), 10, 0, 0)
    with pytest.raises(ValueError, match=r"n must be in \[0, 2\*\*62\]"):
        perm(np.array([0]), 2 ** 62 + 1, 0, 0)
    with pytest.raises(ValueError, match=r"pass_index must be in \[0, 2\*\*32\)"):
        perm(np.array([0]), 10, 0, -1)


# -- statistics: for n = 1000, 2000 seeds (and 2000 passes of one seed) ----------------------------------------

N, DRAWS = 1000, 2000


def _uniformity_failures(draws: np.ndarray) -> list[str]:
    """``draws[s, i]``: the row at position ``i`` in draw ``s`` of a shuffle of ``N`` rows. What looks non-uniform:

    - per position, the counts of each row over the draws: Pearson's chi-square with N - 1 degrees of freedom
      (2000 draws in 1000 cells: 2 expected per cell, where the statistic's mean is exactly N - 1 and its
      variance 2 (N - 1)(1 - 1/draws), so the chi-square distribution fits). 1000 tests at once: the smallest
      p-value must exceed 1e-6 (Bonferroni: a family-wise 0.1 %), and the 1000 p-values must look uniform
      (Kolmogorov-Smirnov p > 1e-3);
    - neighbouring positions: across draws, the correlation of the rows at i and i + 1; each is about
      N(-1/(N-1), 1/draws), so every one must lie within 5 standard errors (family-wise ~6e-4) and their mean
      within 0.005 of -1/(N-1) (its standard error is ~0.0007)."""
    failures = []
    counts = np.stack([np.bincount(draws[:, i], minlength=N) for i in range(N)])
    expected = draws.shape[0] / N
    chi2 = ((counts - expected) ** 2 / expected).sum(axis=1)
    p = stats.chi2.sf(chi2, N - 1)
    if p.min() <= 1e-6 or stats.kstest(p, "uniform").pvalue <= 1e-3:
        failures.append("chi-square")
    z = (draws - draws.mean(axis=0)) / draws.std(axis=0)
    corr = (z[:, :-1] * z[:, 1:]).mean(axis=0)
    if np.abs(corr + 1 / (N - 1)).max() * np.sqrt(draws.shape[0]) > 5 or abs(corr.mean() + 1 / (N - 1)) > 0.005:
        failures.append("neighbours")
    return failures


def test_uniform_over_seeds_and_over_passes():
    positions = np.arange(N)
    over_seeds = np.stack([perm(positions, N, seed, 0) for seed in range(DRAWS)])
    over_passes = np.stack([perm(positions, N, 42, pass_index) for pass_index in range(DRAWS)])
    assert _uniformity_failures(over_seeds) == []
    assert _uniformity_failures(over_passes) == []


def test_the_uniformity_checks_catch_weak_shuffles():
    positions = np.arange(N)
    rng = np.random.default_rng(0)
    shifts = rng.integers(0, N, size=DRAWS)
    rotations = np.stack([(positions + s) % N for s in shifts])            # uniform per position, neighbours +1
    assert "neighbours" in _uniformity_failures(rotations)
    few_keys = np.stack([positions ^ (s % 8) for s in range(DRAWS)]) % N    # rows stay near their position
    assert "chi-square" in _uniformity_failures(few_keys)
    true_shuffles = np.stack([rng.permutation(N) for _ in range(DRAWS)])   # and a real shuffle passes
    assert _uniformity_failures(true_shuffles) == []
