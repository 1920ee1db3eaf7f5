"""Differences from Keras 3 that the Keras oracle fuzz (keras_oracle.py) found, each as a small named test.

Expected values come from Keras' definitions written out here (and the key names Keras 3.15 reports, as the
fuzz observed them). A difference not fixed yet is marked ``xfail(strict=True)`` with the error it raises
today, so the fix shows up as an unexpected pass (then drop the marker and its entry in
``keras_oracle.KNOWN_DIFFERENCES``), while a fix that gives another wrong value still fails.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dfit


class TwoHeads(nn.Module):
    """A fixed linear model with two outputs, returned as a dict (names given) or a list."""

    def __init__(self, names: list[str] | None):
        super().__init__()
        self.first, self.second = nn.Linear(3, 2), nn.Linear(3, 1)
        with torch.no_grad():
            self.first.weight.copy_(torch.tensor([[0.5, -1.0, 0.25], [1.0, 0.5, -0.5]]))
            self.first.bias.copy_(torch.tensor([0.1, -0.2]))
            self.second.weight.copy_(torch.tensor([[-0.3, 0.8, 0.6]]))
            self.second.bias.copy_(torch.tensor([0.05]))
        self.names = names

    def forward(self, x):
        a, b = self.first(x), self.second(x)
        return dict(zip(self.names, (a, b))) if self.names else [a, b]


def _data(n: int = 11):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3))
    return x, rng.normal(size=(n, 2)), rng.normal(size=(n, 1)), rng.uniform(0.2, 2.0, size=n)


def _predict(module: TwoHeads, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(torch.as_tensor(x))
    return [o.numpy() for o in (out.values() if isinstance(out, dict) else out)]


@pytest.mark.parametrize("metric, key", [("log_cosh_error", "log_cosh_error"), ("logcosh", "logcosh")])
def test_log_cosh_error_metric_name(metric, key):
    """Keras 3.15 resolves the metric name 'log_cosh_error' (keras.metrics.get('logcosh') and ('log_cosh') are
    errors there; dfit also accepts 'logcosh', the name LogCoshError objects log): mean over samples of
    mean(log(cosh(y_pred - y_true))), logged under the name as written."""
    x, y, _, _ = _data()
    module = TwoHeads(None).double()
    model = dfit.Model(nn.Sequential(module.first))
    model.compile(optimizer="sgd", loss="mse", metrics=[metric])
    got = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    err = _predict(module, x)[0] - y
    assert set(got) == {"loss", key}
    assert got[key] == pytest.approx(np.log(np.cosh(err)).mean(axis=1).mean(), rel=1e-12)


def test_weighted_metric_name_on_two_outputs():
    """One output with the same metric plain and weighted: Keras 3 logs '<output>_mse' and '<output>_weighted_mse'."""
    x, ya, yb, w = _data()
    module = TwoHeads(["a", "b"]).double()
    model = dfit.Model(module)
    model.compile(optimizer="sgd", loss={"a": "mse", "b": "mae"}, metrics={"a": ["mse"]},
                  weighted_metrics={"a": ["mse"]})
    got = model.evaluate(x, {"a": ya, "b": yb}, batch_size=4, verbose=0, sample_weight=w, return_dict=True)
    pa, _ = _predict(module, x)
    per_sample = ((pa - ya) ** 2).mean(axis=1)
    assert set(got) == {"loss", "a_loss", "b_loss", "a_mse", "a_weighted_mse"}
    assert got["a_mse"] == pytest.approx(per_sample.mean(), rel=1e-12)
    assert got["a_weighted_mse"] == pytest.approx((per_sample * w).sum() / w.sum(), rel=1e-12)


def test_flat_metric_list_is_one_metric_per_output():
    """metrics=["mae", "mse"] on two outputs: Keras 3 gives output_1 'mae' and output_2 'mse', nothing else."""
    x, ya, yb, _ = _data()
    module = TwoHeads(None).double()
    model = dfit.Model(module)
    model.compile(optimizer="sgd", loss=["mse", "mse"], metrics=["mae", "mse"])
    got = model.evaluate(x, [ya, yb], batch_size=4, verbose=0, return_dict=True)
    pa, pb = _predict(module, x)
    assert set(got) == {"loss", "output_1_loss", "output_2_loss", "output_1_mae", "output_2_mse"}
    assert got["output_1_mae"] == pytest.approx(np.abs(pa - ya).mean(), rel=1e-12)
    assert got["output_2_mse"] == pytest.approx(((pb - yb) ** 2).mean(), rel=1e-12)


@pytest.mark.parametrize("name", ["top_k_categorical_accuracy", "sparse_top_k_categorical_accuracy"])
def test_top_k_accuracy_counts_ties(name):
    """Keras: a target is in the top k when its score >= the k-th largest score, so all-equal scores (a dead ReLU
    layer with zero biases, common at initialisation) count as a hit: keras.metrics.top_k_categorical_accuracy
    gives [1, 1] for scores [[0]*6, [1]*6] with targets 5 and 0, k=5. The fuzz found it (seed 339)."""
    # six rows of equal scores, one per target class: with k=5 of 6 classes, an index-based tie break must
    # leave one class out (whichever torch.topk drops); a last row where class 5 is lowest, no tie: a miss
    scores = torch.tensor([[0.5] * 6] * 6 + [[0.1, 0.9, 0.3, 0.3, 0.3, 0.01]])
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 5])
    targets = labels if name.startswith("sparse") else torch.eye(6)[labels]
    identity = nn.Linear(6, 6)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(6))
        identity.bias.zero_()
    model = dfit.Model(identity)
    model.compile(optimizer="sgd", loss="mse" if not name.startswith("sparse") else
                  "sparse_categorical_crossentropy", metrics=[name])
    got = model.evaluate(scores, targets, batch_size=3, verbose=0, return_dict=True)
    assert got[name] == pytest.approx(6 / 7)


def test_cosine_similarity_normalizes_with_keras_epsilon():
    """Keras normalises with ``x * min(rsqrt(sum(x**2)), 1 / 1e-7)``: a vector shorter than 1e-7 is scaled by 1e7,
    not to unit length (dfit used torch's F.normalize, eps 1e-12). At the zero vector the loss is 0 and its
    gradient is finite: -1e7 times the normalised target (Keras' own autograd gives NaN there, which the fuzz
    found as a diverging Keras run with a dead ReLU layer, seed 370). keras.losses.cosine_similarity gives
    [-0, -0.01, -0.4, -(1+2+3)/(sqrt(3)*sqrt(14))] for these rows."""
    y_pred = torch.tensor([[0.0, 0.0, 0.0], [1e-9, 0.0, 0.0], [3e-8, 4e-8, 0.0], [1.0, 2.0, 3.0]],
                          dtype=torch.float64, requires_grad=True)
    y_true = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    expected = [0.0, -1e-9 * 1e7, -(4e-8 * 1e7), -6 / (np.sqrt(3) * np.sqrt(14))]
    loss = dfit.losses.cosine_similarity(y_true, y_pred)
    assert loss.detach().numpy() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    loss.sum().backward()
    assert y_pred.grad[0].numpy() == pytest.approx([-1e7 / np.sqrt(3)] * 3, rel=1e-12)
    metric = dfit.metrics.CosineSimilarity()
    metric.update_state(y_true[1:3], y_pred[1:3].detach())
    assert float(metric.result()) == pytest.approx((0.01 + 0.4) / 2, rel=1e-9)
