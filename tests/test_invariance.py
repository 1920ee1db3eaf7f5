"""World-size invariance: fit/evaluate/predict on 2 and 3 ranks equal 1 rank (float64, rel. diff < 1e-9)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ranks import _plain, run_ranks

pytestmark = pytest.mark.timeout(240)


def make_data(n: int, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5))
    y = rng.integers(0, classes, size=n)
    w = rng.uniform(0.2, 2.0, size=n)
    return x, y, w


def make_model():
    import dfit

    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)])
    model.module.double()
    model.compile(optimizer=torch.optim.SGD(model.module.parameters(), lr=0.2, momentum=0.9),
                  loss=nn.CrossEntropyLoss(), metrics=["accuracy"], weighted_metrics=["accuracy"])
    return model


def train(n: int, batch_size: int, epochs: int, options: dict):
    """Runs on every rank; returns what must not depend on the world size."""
    x, y, w = make_data(n)
    model = make_model()
    options = dict(options)
    if options.pop("weighted", True):  # unweighted runs take the fused summed-loss path
        options.update(sample_weight=w, class_weight={0: 2.0, 2: 0.5})
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, validation_split=0.25, seed=11, verbose=0,
                        **options)
    weights = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    evaluation = model.evaluate(x, y, sample_weight=w, batch_size=7, verbose=0, return_dict=True)
    predictions = model.predict(x, batch_size=6)
    return history.history, history.epoch, weights, evaluation, predictions


def assert_close(a, b, what: str, rtol: float = 1e-9):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    scale = np.maximum(np.abs(a), 1e-12)
    worst = float(np.max(np.abs(a - b) / scale)) if a.size else 0.0
    assert worst < rtol, f"{what}: relative difference {worst:.3e}"


def compare(one, many, world):
    h1, e1, w1, ev1, p1 = one
    for rank, (h, e, w, ev, p) in enumerate(many):
        tag = f"world {world} rank {rank}"
        assert e == e1
        assert list(h) == list(h1), f"{tag}: history keys {list(h)} vs {list(h1)}"
        for key in h1:
            assert_close(h[key], h1[key], f"{tag} history[{key!r}]")
        for key in w1:
            assert_close(w[key], w1[key], f"{tag} weight {key}")
        for key in ev1:
            assert_close(ev[key], ev1[key], f"{tag} evaluate[{key!r}]")
        assert_close(p, p1, f"{tag} predict")


# n=44 and validation_split=0.25: 33 training rows, so batch 8 leaves a last global batch of ONE row
# (ranks 1 and 2 get none of it); 11 validation rows. Neither 44 nor 33 divides by 2, 3 or 8.
CASES = {
    "last-batch-smaller-than-world": (44, 8, 3, {}),
    "steps_per_epoch-repeats-data": (44, 5, 2, {"steps_per_epoch": 9, "validation_steps": 2}),
    "unweighted": (44, 8, 2, {"weighted": False}),
}


def train_cases(names):
    """All cases in one process group (starting ranks is the slow part)."""
    return {name: train(*CASES[name]) for name in names}


@pytest.mark.parametrize("world", [2, 3])
def test_world_size_invariance(world):
    names = sorted(CASES)
    many = run_ranks(train_cases, world, names)
    for name in names:
        one = _plain(train(*CASES[name]))
        assert one[0]["loss"][0] > 0 and "val_weighted_accuracy" in one[0]
        compare(one, [ranks_result[name] for ranks_result in many], world)


def test_weights_change_and_history_is_not_trivial():
    """Guards the invariance test against a degenerate run (e.g. nothing trained)."""
    history, _, weights, _, _ = train(44, 8, 3, {})
    torch.manual_seed(0)
    initial = nn.Linear(5, 8).double().weight
    assert not torch.allclose(weights["linear.weight"], initial)
    assert history["loss"][0] != history["loss"][-1]
