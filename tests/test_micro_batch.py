"""micro_batch_size: the memory knob that changes nothing — any M gives the run without it, on 1, 2 and 3 ranks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ranks import run_ranks

pytestmark = pytest.mark.timeout(240)

SIZES = [None, 1, 3, 7, 1000]      # 1000: more than any rank's part (the whole part at once)


def train_with_each_size():
    import dfit

    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(41, 4)), rng.integers(0, 3, size=41)
    w = rng.uniform(0.5, 2.0, size=41)
    out = {}
    for size in SIZES:
        torch.manual_seed(0)
        model = dfit.Sequential([nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)])
        model.module.double()
        model.compile(optimizer=torch.optim.SGD(model.module.parameters(), lr=0.3),
                      loss=dfit.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        # batch 11: the last global batch has 8 rows; on 3 ranks parts are 4/4/3 and 3/3/2 rows
        history = model.fit(x, y, sample_weight=w, batch_size=11, epochs=2, validation_split=0.2, seed=5,
                            verbose=0, micro_batch_size=size)
        out[size] = (history.history, [p.detach().numpy().copy() for p in model.module.parameters()])
    return out


def assert_same(got, want):
    for key in want[0]:
        np.testing.assert_allclose(got[0][key], want[0][key], rtol=1e-9, err_msg=key)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_any_micro_batch_size_gives_the_same_result(world):
    runs = train_with_each_size() if world == 1 else run_ranks(train_with_each_size, world)[0]
    reference = train_with_each_size()[None] if world > 1 else runs[None]
    for size in SIZES:
        assert_same(runs[size], reference)       # also equal to 1 rank without micro-batching


def test_chunks_really_are_smaller():
    import dfit

    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1).double()

        def forward(self, x):
            seen.append(len(x))
            return self.lin(x)

    model = dfit.Model(Probe())
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.zeros((10, 2)), np.zeros((10, 1)), batch_size=10, epochs=1, verbose=0, micro_batch_size=3)
    assert seen == [3, 3, 3, 1]


def test_batchnorm_refuses_micro_batches_unless_asked():
    import dfit

    model = dfit.Sequential([nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.zeros((8, 2), np.float32), np.zeros((8, 1), np.float32)
    with pytest.raises(ValueError, match=r"BatchNorm layer\(s\) \['batchnorm1d'\].*per_chunk_batchnorm=True"):
        model.fit(x, y, epochs=1, verbose=0, micro_batch_size=2)
    model.fit(x, y, epochs=1, verbose=0, micro_batch_size=4, per_chunk_batchnorm=True)
    with pytest.raises(ValueError, match="micro_batch_size must be a positive integer"):
        model.fit(x, y, epochs=1, verbose=0, micro_batch_size=0)
