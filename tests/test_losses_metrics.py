"""Losses and metrics by Keras name against Keras' formulas, computed here in plain numpy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import dfit
from dfit import losses as L
from dfit import metrics as M
from core_helpers import F64, fixed_linear, frozen, frozen_model, mse_rows

pytestmark = pytest.mark.timeout(60)
EPS = 1e-7
RNG = np.random.default_rng(1234)


class Identity(nn.Module):
    """Returns its input (so evaluate(x=y_pred, y=y_true) evaluates a loss on chosen predictions)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1, dtype=F64))

    def forward(self, x):
        return x + 0.0 * self.unused  # exact values, but connected to a parameter so fit can backprop


def _evaluate_loss(loss, y_pred, y_true, sample_weight=None, **kw):
    model = frozen_model(Identity(), loss=loss, **kw)
    return model.evaluate(y_pred, y_true, sample_weight=sample_weight, verbose=0, batch_size=3)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


# Keras' per-sample definitions (keras/src/losses/losses.py, from_logits=False).
def k_bce(p, t):
    p = np.clip(p, EPS, 1 - EPS)
    return -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean(-1)


def k_cce(p, t):
    p = np.clip(p / p.sum(-1, keepdims=True), EPS, 1 - EPS)
    return -(t * np.log(p)).sum(-1)


def k_signed(t):
    return 2 * t - 1 if np.isin(t, [0, 1]).all() else t


def k_l2n(v):
    return v / np.maximum(np.sqrt((v ** 2).sum(-1, keepdims=True)), 1e-12)


def k_huber(p, t, delta=1.0):
    e = np.abs(p - t)
    return np.where(e <= delta, 0.5 * e ** 2, delta * e - 0.5 * delta ** 2).mean(-1)


REGRESSION = {
    "mse": lambda p, t: ((p - t) ** 2).mean(-1),
    "mean_squared_error": lambda p, t: ((p - t) ** 2).mean(-1),
    "mae": lambda p, t: np.abs(p - t).mean(-1),
    "mean_absolute_error": lambda p, t: np.abs(p - t).mean(-1),
    "mape": lambda p, t: 100 * (np.abs(t - p) / np.maximum(np.abs(t), EPS)).mean(-1),
    "msle": lambda p, t: ((np.log1p(np.maximum(p, EPS)) - np.log1p(np.maximum(t, EPS))) ** 2).mean(-1),
    "huber": k_huber,
    "log_cosh": lambda p, t: (np.log(np.cosh(p - t))).mean(-1),
    "logcosh": lambda p, t: (np.log(np.cosh(p - t))).mean(-1),
    "cosine_similarity": lambda p, t: -(k_l2n(t) * k_l2n(p)).sum(-1),
}


@pytest.mark.parametrize("name", sorted(REGRESSION))
def test_regression_losses_by_name(name):
    p, t = RNG.normal(size=(7, 3)), RNG.normal(size=(7, 3))
    if name == "msle":
        p, t = np.abs(p), np.abs(t)
    expected = REGRESSION[name](p, t)
    got = L.get(name)(torch.tensor(t), torch.tensor(p)).numpy()  # Keras order
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert _evaluate_loss(name, p, t) == pytest.approx(expected.mean(), rel=1e-10)


def test_huber_with_delta_crosses_both_branches():
    p = np.array([[0.0, 0.5, 3.0]])
    t = np.array([[0.2, 2.5, -1.0]])
    got = L.Huber(delta=1.5).call(torch.tensor(t), torch.tensor(p)).numpy()
    np.testing.assert_allclose(got, k_huber(p, t, 1.5), rtol=1e-12)


def test_probability_losses_by_name():
    t_bin = RNG.integers(0, 2, size=(8, 2)).astype(np.float64)
    p_bin = RNG.uniform(0, 1, size=(8, 2))
    p_bin[0, 0], p_bin[1, 1] = 0.0, 1.0  # clipping to [eps, 1 - eps]
    for name in ("binary_crossentropy", "bce"):
        assert _evaluate_loss(name, p_bin, t_bin) == pytest.approx(k_bce(p_bin, t_bin).mean(), rel=1e-10)

    labels = RNG.integers(0, 4, size=8)
    one_hot = np.eye(4)[labels]
    p = _softmax(RNG.normal(size=(8, 4))) * 3.0  # unnormalised: Keras divides by the row sum
    assert _evaluate_loss("categorical_crossentropy", p, one_hot) == pytest.approx(k_cce(p, one_hot).mean(), rel=1e-10)
    assert _evaluate_loss("sparse_categorical_crossentropy", p, labels) == pytest.approx(
        k_cce(p, one_hot).mean(), rel=1e-10)
    assert _evaluate_loss("sparse_categorical_crossentropy", p, labels.reshape(8, 1)) == pytest.approx(
        k_cce(p, one_hot).mean(), rel=1e-10)

    q = _softmax(RNG.normal(size=(8, 4)))
    r = _softmax(RNG.normal(size=(8, 4)))
    kl = (np.clip(r, EPS, 1) * np.log(np.clip(r, EPS, 1) / np.clip(q, EPS, 1))).sum(-1)
    for name in ("kl_divergence", "kld", "kullback_leibler_divergence"):
        assert _evaluate_loss(name, q, r) == pytest.approx(kl.mean(), rel=1e-10)

    rate, counts = RNG.uniform(0.1, 3, size=(8, 1)), RNG.integers(0, 5, size=(8, 1)).astype(np.float64)
    assert _evaluate_loss("poisson", rate, counts) == pytest.approx(
        (rate - counts * np.log(rate + EPS)).mean(), rel=1e-10)


def test_hinge_losses_convert_01_labels_to_signs():
    scores = RNG.normal(size=(6, 3))
    t01 = RNG.integers(0, 2, size=(6, 3)).astype(np.float64)
    s = k_signed(t01)
    hinge = np.maximum(1 - s * scores, 0).mean(-1)
    assert _evaluate_loss("hinge", scores, t01) == pytest.approx(hinge.mean(), rel=1e-10)
    assert _evaluate_loss("hinge", scores, s) == pytest.approx(hinge.mean(), rel=1e-10)  # -1/1 labels as given
    assert _evaluate_loss("squared_hinge", scores, t01) == pytest.approx(
        (np.maximum(1 - s * scores, 0) ** 2).mean(-1).mean(), rel=1e-10)
    one_hot = np.eye(3)[RNG.integers(0, 3, size=6)]
    pos = (one_hot * scores).sum(-1)
    neg = ((1 - one_hot) * scores).max(-1)
    assert _evaluate_loss("categorical_hinge", scores, one_hot) == pytest.approx(
        np.maximum(neg - pos + 1, 0).mean(), rel=1e-10)


def test_from_logits_variants():
    z = RNG.normal(size=(9, 1)) * 3
    t = RNG.integers(0, 2, size=(9, 1)).astype(np.float64)
    exact_bce = -(t * np.log(_sigmoid(z)) + (1 - t) * np.log(1 - _sigmoid(z))).mean(-1)
    assert _evaluate_loss(L.BinaryCrossentropy(from_logits=True), z, t) == pytest.approx(exact_bce.mean(), rel=1e-10)
    # from_logits=False on the same numbers treats them as (clipped) probabilities: a different loss
    assert _evaluate_loss(L.BinaryCrossentropy(), _sigmoid(z), t) == pytest.approx(
        k_bce(_sigmoid(z), t).mean(), rel=1e-9)

    logits = RNG.normal(size=(9, 5))
    labels = RNG.integers(0, 5, size=9)
    logp = np.log(_softmax(logits))
    exact = -logp[np.arange(9), labels]
    assert _evaluate_loss(L.CategoricalCrossentropy(from_logits=True), logits, np.eye(5)[labels]) == pytest.approx(
        exact.mean(), rel=1e-10)
    assert _evaluate_loss(L.SparseCategoricalCrossentropy(from_logits=True), logits, labels) == pytest.approx(
        exact.mean(), rel=1e-10)


def test_label_smoothing_matches_keras():
    p = RNG.uniform(0.05, 0.95, size=(5, 1))
    t = RNG.integers(0, 2, size=(5, 1)).astype(np.float64)
    got = L.BinaryCrossentropy(label_smoothing=0.2).call(torch.tensor(t), torch.tensor(p)).numpy()
    np.testing.assert_allclose(got, k_bce(p, t * 0.8 + 0.1), rtol=1e-10)
    probs = _softmax(RNG.normal(size=(5, 4)))
    oh = np.eye(4)[RNG.integers(0, 4, size=5)]
    got = L.CategoricalCrossentropy(label_smoothing=0.2).call(torch.tensor(oh), torch.tensor(probs)).numpy()
    np.testing.assert_allclose(got, k_cce(probs, oh * 0.8 + 0.2 / 4), rtol=1e-10)


def test_loss_names_are_case_insensitive_and_unknown_names_fail():
    assert L.get("MSE") is L.mean_squared_error
    with pytest.raises(ValueError, match="Unknown loss 'msee'"):
        dfit.Model(Identity()).compile(loss="msee")
    with pytest.raises(TypeError, match="loss"):
        dfit.Model(Identity()).compile(loss=3)


def test_targets_of_shape_n_against_predictions_of_shape_n_1_do_not_broadcast():
    p, t = RNG.normal(size=(6, 1)), RNG.normal(size=6)
    assert _evaluate_loss("mse", p, t) == pytest.approx(((p[:, 0] - t) ** 2).mean(), rel=1e-12)


# -- torch loss modules and callables -----------------------------------------------------------------------
@pytest.mark.parametrize("module,make", [
    (nn.MSELoss(), lambda: (RNG.normal(size=(7, 2)), RNG.normal(size=(7, 2)))),
    (nn.L1Loss(), lambda: (RNG.normal(size=(7, 1)), RNG.normal(size=(7, 1)))),
    (nn.SmoothL1Loss(), lambda: (RNG.normal(size=(7, 1)) * 3, RNG.normal(size=(7, 1)))),
    (nn.BCEWithLogitsLoss(), lambda: (RNG.normal(size=(7, 1)), RNG.integers(0, 2, (7, 1)).astype(float))),
    (nn.BCELoss(), lambda: (RNG.uniform(0.01, 0.99, size=(7, 1)), RNG.integers(0, 2, (7, 1)).astype(float))),
    (nn.CrossEntropyLoss(), lambda: (RNG.normal(size=(7, 4)), RNG.integers(0, 4, size=7))),
    (nn.NLLLoss(), lambda: (np.log(_softmax(RNG.normal(size=(7, 4)))), RNG.integers(0, 4, size=7))),
])
def test_torch_loss_modules_give_their_mean_reduction(module, make):
    p, t = make()
    expected = module(torch.tensor(p), torch.tensor(t)).item()  # the module's own (mean) reduction
    assert _evaluate_loss(module, p, t) == pytest.approx(expected, rel=1e-10)
    assert module.reduction == "mean"  # the user's module is not modified


def test_cross_entropy_module_with_sample_weights():
    p, t = RNG.normal(size=(7, 4)), RNG.integers(0, 4, size=7)
    w = RNG.uniform(0, 2, size=7)
    per = nn.CrossEntropyLoss(reduction="none")(torch.tensor(p), torch.tensor(t)).numpy()
    assert _evaluate_loss(nn.CrossEntropyLoss(), p, t, sample_weight=w) == pytest.approx((w * per).sum() / 7, rel=1e-10)


def test_callable_loss_returning_per_sample_values():
    def cubic(y_pred, y_true):
        return (y_pred - y_true).abs().pow(3).sum(dim=-1)

    p, t = RNG.normal(size=(8, 2)), RNG.normal(size=(8, 2))
    w = RNG.uniform(0, 2, size=8)
    per = (np.abs(p - t) ** 3).sum(-1)
    assert _evaluate_loss(cubic, p, t) == pytest.approx(per.mean(), rel=1e-12)
    assert _evaluate_loss(cubic, p, t, sample_weight=w) == pytest.approx((w * per).sum() / 8, rel=1e-12)


def test_callable_loss_returning_a_scalar_is_the_batch_mean_and_refuses_sample_weights():
    def mean_sq(y_pred, y_true):
        return ((y_pred - y_true) ** 2).mean()

    p, t = RNG.normal(size=(8, 1)), RNG.normal(size=(8, 1))
    assert _evaluate_loss(mean_sq, p, t) == pytest.approx(((p - t) ** 2).mean(), rel=1e-12)
    with pytest.raises(ValueError, match="loss 'mean_sq' returned a scalar, so sample weights cannot be applied"):
        _evaluate_loss(mean_sq, p, t, sample_weight=np.ones(8))

    class BatchMeanLoss(L.Loss):  # a Loss object whose call() already averages: named by its name
        def call(self, y_true, y_pred):
            return ((y_pred - y_true) ** 2).mean()

    assert _evaluate_loss(BatchMeanLoss(), p, t) == pytest.approx(((p - t) ** 2).mean(), rel=1e-12)
    with pytest.raises(ValueError, match="loss 'batch_mean_loss' returned a scalar"):
        _evaluate_loss(BatchMeanLoss(), p, t, sample_weight=np.ones(8))


def test_loss_weights_and_per_output_losses():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Parameter(torch.zeros(1, dtype=F64))

        def forward(self, a, b):
            return [a + 0.0 * self.unused, b]

    a_pred, a_true = RNG.normal(size=(6, 2)), RNG.normal(size=(6, 2))
    b_pred, b_true = RNG.normal(size=(6, 1)), RNG.normal(size=(6, 1))
    model = frozen_model(Two(), loss=["mse", "mae"], loss_weights=[0.5, 2.0])
    total, l1, l2 = model.evaluate([a_pred, b_pred], [a_true, b_true], verbose=0)
    mse = mse_rows(a_pred, a_true).mean()
    mae = np.abs(b_pred - b_true).mean()
    assert (l1, l2) == (pytest.approx(mse, rel=1e-12), pytest.approx(mae, rel=1e-12))
    assert total == pytest.approx(0.5 * mse + 2.0 * mae, rel=1e-12)


# -- metrics -----------------------------------------------------------------------------------------------
def _fit_logs(module, loss, x, y, **kw):
    metrics = kw.pop("metrics", None)
    weighted = kw.pop("weighted_metrics", None)
    model = frozen_model(module, loss=loss, metrics=metrics, weighted_metrics=weighted)
    history = model.fit(x, y, epochs=1, verbose=0, batch_size=4, **kw)
    return {k: v[0] for k, v in history.history.items()}


def test_accuracy_resolves_to_binary_accuracy_for_binary_crossentropy():
    p = np.array([[0.2], [0.7], [0.5], [0.9], [0.4], [0.51]])
    t = np.array([[0.0], [1.0], [1.0], [0.0], [0.0], [1.0]])
    logs = _fit_logs(Identity(), "binary_crossentropy", p, t, metrics=["accuracy"])
    assert logs["accuracy"] == pytest.approx(((p > 0.5) == t).mean(), rel=1e-12)  # 0.5 is not > 0.5
    logs = _fit_logs(Identity(), "binary_crossentropy", p, t, metrics=["acc"])
    assert list(logs) == ["loss", "acc"] and logs["acc"] == pytest.approx(4 / 6)


def test_accuracy_threshold_is_half_even_for_logits_as_keras_3():
    """Keras 3 resolves 'accuracy' from shapes only: a single-unit output gets BinaryAccuracy(threshold=0.5),
    whatever the loss's from_logits says."""
    z = np.array([[-0.5], [0.3], [2.0], [-2.0], [0.1], [0.4]])
    t = np.array([[0.0], [1.0], [1.0], [1.0], [1.0], [0.0]])
    assert ((z > 0.5) == t).mean() != ((z > 0) == t).mean()
    logs = _fit_logs(Identity(), L.BinaryCrossentropy(from_logits=True), z, t, metrics=["accuracy"])
    assert logs["accuracy"] == pytest.approx(((z > 0.5) == t).mean())
    logs = _fit_logs(Identity(), nn.BCEWithLogitsLoss(), z, t, metrics=["acc"])
    assert logs["acc"] == pytest.approx(((z > 0.5) == t).mean())


def test_accuracy_resolves_to_categorical_and_sparse_categorical():
    probs = _softmax(RNG.normal(size=(10, 3)))
    labels = RNG.integers(0, 3, size=10)
    expected = (probs.argmax(-1) == labels).mean()
    assert 0 < expected < 1
    logs = _fit_logs(Identity(), "categorical_crossentropy", probs, np.eye(3)[labels], metrics=["accuracy"])
    assert logs["accuracy"] == pytest.approx(expected)
    logs = _fit_logs(Identity(), "sparse_categorical_crossentropy", probs, labels, metrics=["accuracy"])
    assert logs["accuracy"] == pytest.approx(expected)
    logs = _fit_logs(Identity(), nn.CrossEntropyLoss(), probs, labels, metrics=["acc"])
    assert logs["acc"] == pytest.approx(expected)


def test_accuracy_with_integer_one_hot_labels_is_categorical_accuracy():
    """Keras 3 resolves 'accuracy' from shapes: same-shape targets are one-hot, whatever their dtype."""
    probs = _softmax(RNG.normal(size=(10, 3)))
    labels = RNG.integers(0, 3, size=10)
    logs = _fit_logs(Identity(), "categorical_crossentropy", probs, np.eye(3, dtype=np.int64)[labels],
                     metrics=["accuracy"])
    assert logs["accuracy"] == pytest.approx((probs.argmax(-1) == labels).mean())


def test_named_metrics_against_formulas():
    probs = _softmax(RNG.normal(size=(12, 6)))
    labels = RNG.integers(0, 6, size=12)
    oh = np.eye(6)[labels]
    names = ["categorical_accuracy", "top_k_categorical_accuracy", "mse", "mae", "categorical_crossentropy"]
    logs = _fit_logs(Identity(), "categorical_crossentropy", probs, oh, metrics=names)
    top5 = np.argsort(-probs, axis=-1)[:, :5]
    assert logs["categorical_accuracy"] == pytest.approx((probs.argmax(-1) == labels).mean())
    assert logs["top_k_categorical_accuracy"] == pytest.approx(np.mean([labels[i] in top5[i] for i in range(12)]))
    assert logs["mse"] == pytest.approx(((probs - oh) ** 2).mean(), rel=1e-12)
    assert logs["mae"] == pytest.approx(np.abs(probs - oh).mean(), rel=1e-12)
    assert logs["categorical_crossentropy"] == pytest.approx(logs["loss"], rel=1e-12)
    logs = _fit_logs(Identity(), "sparse_categorical_crossentropy", probs, labels,
                     metrics=["sparse_categorical_accuracy", "sparse_top_k_categorical_accuracy"])
    assert logs["sparse_categorical_accuracy"] == pytest.approx((probs.argmax(-1) == labels).mean())
    assert logs["sparse_top_k_categorical_accuracy"] == pytest.approx(
        np.mean([labels[i] in top5[i] for i in range(12)]))


def test_binary_accuracy_and_rmse_metrics():
    p = RNG.uniform(size=(9, 1))
    t = RNG.integers(0, 2, size=(9, 1)).astype(np.float64)
    logs = _fit_logs(Identity(), "mse", p, t, metrics=["binary_accuracy", "root_mean_squared_error"])
    assert logs["binary_accuracy"] == pytest.approx(((p > 0.5) == t).mean())
    assert logs["root_mean_squared_error"] == pytest.approx(math.sqrt(((p - t) ** 2).mean()), rel=1e-12)


def test_callable_metric_named_after_the_function():
    def max_error(y_pred, y_true):
        return (y_pred - y_true).abs().amax(dim=-1)

    p, t = RNG.normal(size=(7, 3)), RNG.normal(size=(7, 3))
    logs = _fit_logs(Identity(), "mse", p, t, metrics=[max_error])
    assert logs["max_error"] == pytest.approx(np.abs(p - t).max(-1).mean(), rel=1e-12)


def test_weighted_metrics_use_sample_weights_plain_metrics_ignore_them():
    p, t = RNG.normal(size=(10, 1)), RNG.normal(size=(10, 1))
    w = RNG.uniform(0, 3, size=10)
    ae = np.abs(p - t)[:, 0]
    logs = _fit_logs(Identity(), "mse", p, t, metrics=["mae"], weighted_metrics=["mae"], sample_weight=w)
    assert list(logs) == ["loss", "mae", "weighted_mae"]
    assert logs["mae"] == pytest.approx(ae.mean(), rel=1e-12)
    assert logs["weighted_mae"] == pytest.approx((w * ae).sum() / w.sum(), rel=1e-12)
    # without sample weights a weighted metric is the plain mean
    logs = _fit_logs(Identity(), "mse", p, t, weighted_metrics=["mae"])
    assert logs["mae"] == pytest.approx(ae.mean(), rel=1e-12)


def test_weighted_metrics_use_class_weights_too():
    p = RNG.uniform(size=(8, 1))
    labels = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    cw = {0: 1.0, 1: 3.0}
    w = np.array([cw[c] for c in labels])
    logs = _fit_logs(Identity(), "binary_crossentropy", p, labels.reshape(8, 1).astype(float),
                     metrics=["binary_accuracy"], weighted_metrics=["binary_accuracy"], class_weight=cw)
    correct = ((p[:, 0] > 0.5) == labels).astype(float)
    assert logs["binary_accuracy"] == pytest.approx(correct.mean())
    assert logs["weighted_binary_accuracy"] == pytest.approx((w * correct).sum() / w.sum())


def test_history_key_order_loss_then_metrics_in_compile_order_then_val():
    p, t = RNG.normal(size=(10, 1)), RNG.normal(size=(10, 1))
    model = frozen_model(Identity(), metrics=["mse", "mae", "msle"])
    history = model.fit(p, t, epochs=2, verbose=0, validation_split=0.2)
    assert list(history.history) == ["loss", "mse", "mae", "msle", "val_loss", "val_mse", "val_mae", "val_msle"]
    assert list(history.to_dataframe().columns) == list(history.history)
    assert list(history.to_dataframe().index) == [0, 1]


def test_unknown_metric_names_fail_at_compile():
    with pytest.raises(ValueError, match="Unknown metric 'acuracy'"):
        dfit.Model(Identity()).compile(loss="mse", metrics=["acuracy"])
    with pytest.raises(ValueError, match="Unknown metric"):
        dfit.Model(Identity()).compile(loss="mse", weighted_metrics=["nope"])
    with pytest.raises(TypeError, match="metric"):
        dfit.Model(Identity()).compile(loss="mse", metrics=[3])


def test_torchmetrics_metric():
    torchmetrics = pytest.importorskip("torchmetrics")
    p = _softmax(RNG.normal(size=(11, 3)))
    labels = RNG.integers(0, 3, size=11)
    metric = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")
    logs = _fit_logs(Identity(), "sparse_categorical_crossentropy", p, labels, metrics=[metric])
    assert list(logs) == ["loss", "multiclass_accuracy"]
    assert logs["multiclass_accuracy"] == pytest.approx((p.argmax(-1) == labels).mean(), rel=1e-6)
    with pytest.raises(ValueError, match="torchmetrics"):
        _fit_logs(Identity(), "sparse_categorical_crossentropy", p, labels, weighted_metrics=[metric])


def test_per_output_metrics_for_multi_output_models():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Parameter(torch.zeros(1, dtype=F64))

        def forward(self, x):
            x = x + 0.0 * self.unused
            return {"reg": x[:, :1], "cls": x[:, 1:]}

    x = np.concatenate([RNG.normal(size=(8, 1)), RNG.uniform(size=(8, 1))], axis=1)
    y = {"reg": RNG.normal(size=(8, 1)), "cls": RNG.integers(0, 2, size=(8, 1)).astype(float)}
    model = frozen_model(Two(), loss={"reg": "mse", "cls": "binary_crossentropy"},
                         metrics={"reg": ["mae"], "cls": ["accuracy"]})
    history = model.fit(x, y, epochs=1, verbose=0)
    logs = {k: v[0] for k, v in history.history.items()}
    assert list(logs) == ["loss", "reg_loss", "cls_loss", "reg_mae", "cls_accuracy"]
    assert logs["reg_mae"] == pytest.approx(np.abs(x[:, :1] - y["reg"]).mean(), rel=1e-12)
    assert logs["cls_accuracy"] == pytest.approx(((x[:, 1:] > 0.5) == y["cls"]).mean())
    assert logs["reg_loss"] == pytest.approx(((x[:, :1] - y["reg"]) ** 2).mean(), rel=1e-12)
    assert logs["cls_loss"] == pytest.approx(k_bce(x[:, 1:], y["cls"]).mean(), rel=1e-10)
    assert logs["loss"] == pytest.approx(logs["reg_loss"] + logs["cls_loss"], rel=1e-12)


def test_metrics_get_accepts_names_and_rejects_unknown_directly():
    m = M.get("mae")
    assert m.name == "mae" and isinstance(m, M.MeanMetricWrapper)
    with pytest.raises(ValueError, match="Unknown metric 'nope'"):
        M.get("nope")


def test_fixed_linear_helper_sanity():
    layer = fixed_linear([[2.0, -1.0]], [0.5])
    assert layer(torch.tensor([[1.0, 1.0]], dtype=F64)).item() == pytest.approx(1.5)
    assert isinstance(frozen(layer.parameters()), torch.optim.SGD)


# -- sequence targets: a loss reduces only the LAST axis (found by mutation testing, see tests/README.md) ----------
def _np_per_step(name, t, p):
    """Keras' per-(sample, step) values for (batch, steps, features) arrays, written out in numpy."""
    err = p - t
    if name == "mean_absolute_percentage_error":
        return 100 * np.abs(err / np.maximum(np.abs(t), EPS)).mean(-1)
    if name == "huber":
        a = np.abs(err)
        return np.where(a <= 1.0, 0.5 * a ** 2, a - 0.5).mean(-1)
    if name == "squared_hinge":
        return np.maximum(1 - k_signed(t) * p, 0).__pow__(2).mean(-1)
    if name == "hinge":
        return np.maximum(1 - k_signed(t) * p, 0).mean(-1)
    if name == "mean_squared_error":
        return (err ** 2).mean(-1)
    if name == "mean_absolute_error":
        return np.abs(err).mean(-1)
    if name == "log_cosh":
        return np.log(np.cosh(err)).mean(-1)
    if name == "cosine_similarity":
        unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
        return -(unit(t) * unit(p)).sum(-1)
    raise KeyError(name)


@pytest.mark.parametrize("name", ["mean_absolute_percentage_error", "huber", "squared_hinge", "hinge",
                                  "mean_squared_error", "mean_absolute_error", "log_cosh", "cosine_similarity"])
def test_losses_of_sequences_reduce_only_the_last_axis(name):
    t = RNG.integers(0, 2, size=(2, 3, 4)).astype(np.float64) if "hinge" in name else RNG.normal(size=(2, 3, 4))
    p = RNG.normal(size=(2, 3, 4)) * 2
    got = getattr(L, name)(torch.from_numpy(t), torch.from_numpy(p))
    assert tuple(got.shape) == (2, 3)
    np.testing.assert_allclose(got.numpy(), _np_per_step(name, t, p), rtol=1e-12, atol=1e-12)


def test_kl_divergence_clips_targets_to_at_most_one():
    t = np.array([[0.2, 1.5, 3.0], [0.0, 0.5, 2.0]])
    p = np.array([[0.3, 0.3, 0.4], [0.1, 0.6, 0.3]])
    tc, pc = np.clip(t, EPS, 1.0), np.clip(p, EPS, 1.0)
    got = L.kl_divergence(torch.from_numpy(t), torch.from_numpy(p))
    np.testing.assert_allclose(got.numpy(), (tc * np.log(tc / pc)).sum(-1), rtol=1e-12)


def test_accuracy_function_is_per_sample_and_keeps_the_prediction_dtype():
    t1, p1 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 3.0])
    assert M.accuracy(t1, p1).tolist() == [1.0, 0.0, 1.0]
    assert M.accuracy(t1, p1).dtype == torch.float32
    t2, p2 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    assert M.accuracy(t2, p2).tolist() == [0.5, 1.0]
    t3 = torch.tensor([[[1, 2], [3, 4], [5, 6]]])
    p3 = torch.tensor([[[1, 0], [3, 4], [0, 0]]])
    assert M.accuracy(t3, p3).tolist() == [[0.5, 1.0, 0.0]]
    assert M.accuracy(t3, p3).dtype == torch.float64  # integer predictions: float64 values


def test_unknown_metric_message_lists_every_known_name():
    with pytest.raises(ValueError, match=r"Unknown metric 'nope'\. Known names: ") as info:
        M.get("nope")
    known = str(info.value).split("Known names: ", 1)[1].split(", ")
    assert known == sorted(known)
    # one name from each table: a function, a snake-case class name, a class
    assert {"mse", "binary_accuracy", "auc", "root_mean_squared_error", "AUC", "Precision"} <= set(known)


def test_top_k_accuracy_of_sequences_is_per_step():
    # (batch 1, 2 steps, 3 classes): step 0's target class 2 is in the top 2, step 1's class 0 is not
    p = torch.tensor([[[0.1, 0.5, 0.4], [0.1, 0.5, 0.4]]])
    t = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
    assert M.top_k_categorical_accuracy(t, p, k=2).tolist() == [[1.0, 0.0]]
    assert M.sparse_top_k_categorical_accuracy(torch.tensor([[2, 0]]), p, k=2).tolist() == [[1.0, 0.0]]
    # k is capped by the number of CLASSES (3 here), not by the number of steps (2)
    assert M.sparse_top_k_categorical_accuracy(torch.tensor([[2, 0]]), p, k=3).tolist() == [[1.0, 1.0]]


def test_sparse_crossentropy_from_logits_of_sequences():
    z = RNG.normal(size=(5, 3, 4))          # (batch, steps, classes) logits
    t = RNG.integers(0, 4, size=(5, 3))     # one class per step
    logp = np.log(_softmax(z))
    want = -np.take_along_axis(logp, t[..., None], -1)[..., 0].mean()
    got = _evaluate_loss(L.SparseCategoricalCrossentropy(from_logits=True), z, t)
    assert got == pytest.approx(want, rel=1e-12)
    w = RNG.uniform(0.5, 2.0, size=5)   # weighted: the per-element path instead of the fused sum
    per_sample = -np.take_along_axis(logp, t[..., None], -1)[..., 0].mean(-1)
    got = _evaluate_loss(L.SparseCategoricalCrossentropy(from_logits=True), z, t, sample_weight=w)
    assert got == pytest.approx((w * per_sample).mean(), rel=1e-12)


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), torch.nn.functional.cross_entropy])
def test_torch_cross_entropy_takes_integer_labels_of_shape_n_1(loss):
    z = RNG.normal(size=(7, 3))
    t = RNG.integers(0, 3, size=(7, 1))
    want = -np.take_along_axis(np.log(_softmax(z)), t, -1).mean()
    assert _evaluate_loss(loss, z, t) == pytest.approx(want, rel=1e-12)


def test_targets_with_a_trailing_axis_of_one_against_flat_predictions():
    p, t = torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.tensor([[[1.0], [0.0]], [[2.0], [1.0]]])
    # y_true (2, 2, 1) against y_pred (2, 2): the trailing 1 is dropped, no (2, 2, 2) broadcast
    assert L.mean_squared_error(t, p).tolist() == [(0 + 4) / 2, (4 + 0) / 2]


def test_loss_weights_of_the_wrong_length_are_named_in_the_error():
    with pytest.raises(ValueError, match="loss_weights has 3 entries, one per model output"):
        L.CompiledLoss("mse", [1.0, 2.0, 3.0], ["a", "b"])
