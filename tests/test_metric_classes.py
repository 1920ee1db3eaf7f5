"""Keras 3 metric classes: values against formulas written here (numpy), scikit-learn and Keras 3 itself;
exactness on 1, 2 and 3 ranks; Keras 3's per-output spreading, naming and 'accuracy' resolution."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch import nn

import dfit
from dfit import metrics as M
from core_helpers import F64, frozen_model
from ranks import run_ranks

pytestmark = pytest.mark.timeout(240)
RNG = np.random.default_rng(7)
EPS = 1e-7


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("keras is imported with another backend")
    return keras


def _t(a):
    return torch.as_tensor(np.asarray(a))


def _in_batches(metric, t, p, w=None, sizes=(3, 5, 100)):
    """Update in uneven batches (additivity within a rank), return the result as numpy."""
    start = 0
    for size in sizes:
        sl = slice(start, start + size)
        if start >= len(t):
            break
        metric.update_state(_t(t[sl]), _t(p[sl]), None if w is None else _t(w[sl]))
        start += size
    return np.asarray(metric.result().detach().cpu().numpy(), dtype=np.float64)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _data(kind, n=13):
    if kind == "binary":
        return RNG.integers(0, 2, size=(n, 1)).astype(float), RNG.uniform(0.01, 0.99, size=(n, 1))
    if kind == "onehot":
        return np.eye(4)[RNG.integers(0, 4, size=n)], _softmax(RNG.normal(size=(n, 4)))
    if kind == "sparse":
        return RNG.integers(0, 4, size=(n, 1)), _softmax(RNG.normal(size=(n, 4)))
    if kind == "positive":
        return RNG.uniform(0.1, 3, size=(n, 3)), RNG.uniform(0.1, 3, size=(n, 3))
    return RNG.normal(size=(n, 3)), RNG.normal(size=(n, 3))


def _bce(t, p):
    p = np.clip(p, EPS, 1 - EPS)
    return -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean(-1)


def _l2n(v):
    return v / np.sqrt((v ** 2).sum(-1, keepdims=True))


def _topk(t, p, k):
    top = np.argsort(-p, axis=-1)[:, :k]
    return np.array([t[i] in top[i] for i in range(len(t))], dtype=float)


FORMULAS = {  # class, data kind, default name, per-sample formula (t, p) -> (n,), final transform
    "Accuracy": (M.Accuracy, "sparse", "accuracy", None, None),
    "BinaryAccuracy": (M.BinaryAccuracy, "binary", "binary_accuracy", lambda t, p: ((p > 0.5) == t).mean(-1), None),
    "CategoricalAccuracy": (M.CategoricalAccuracy, "onehot", "categorical_accuracy",
                            lambda t, p: (p.argmax(-1) == t.argmax(-1)).astype(float), None),
    "SparseCategoricalAccuracy": (M.SparseCategoricalAccuracy, "sparse", "sparse_categorical_accuracy",
                                  lambda t, p: (p.argmax(-1) == t[:, 0]).astype(float), None),
    "TopKCategoricalAccuracy": (lambda: M.TopKCategoricalAccuracy(k=2), "onehot", "top_k_categorical_accuracy",
                                lambda t, p: _topk(t.argmax(-1), p, 2), None),
    "SparseTopKCategoricalAccuracy": (lambda: M.SparseTopKCategoricalAccuracy(k=2), "sparse",
                                      "sparse_top_k_categorical_accuracy", lambda t, p: _topk(t[:, 0], p, 2), None),
    "MeanSquaredError": (M.MeanSquaredError, "real", "mean_squared_error", lambda t, p: ((p - t) ** 2).mean(-1), None),
    "RootMeanSquaredError": (M.RootMeanSquaredError, "real", "root_mean_squared_error",
                             lambda t, p: ((p - t) ** 2).mean(-1), np.sqrt),
    "MeanAbsoluteError": (M.MeanAbsoluteError, "real", "mean_absolute_error", lambda t, p: np.abs(p - t).mean(-1),
                          None),
    "MeanAbsolutePercentageError": (M.MeanAbsolutePercentageError, "positive", "mean_absolute_percentage_error",
                                    lambda t, p: 100 * (np.abs(t - p) / np.abs(t)).mean(-1), None),
    "MeanSquaredLogarithmicError": (M.MeanSquaredLogarithmicError, "positive", "mean_squared_logarithmic_error",
                                    lambda t, p: ((np.log1p(p) - np.log1p(t)) ** 2).mean(-1), None),
    "CosineSimilarity": (M.CosineSimilarity, "real", "cosine_similarity", lambda t, p: (_l2n(t) * _l2n(p)).sum(-1),
                         None),
    "LogCoshError": (M.LogCoshError, "real", "logcosh", lambda t, p: np.log(np.cosh(p - t)).mean(-1), None),
    "BinaryCrossentropy": (M.BinaryCrossentropy, "binary", "binary_crossentropy", _bce, None),
    "CategoricalCrossentropy": (M.CategoricalCrossentropy, "onehot", "categorical_crossentropy",
                                lambda t, p: -(t * np.log(p)).sum(-1), None),
    "SparseCategoricalCrossentropy": (M.SparseCategoricalCrossentropy, "sparse", "sparse_categorical_crossentropy",
                                      lambda t, p: -np.log(p[np.arange(len(t)), t[:, 0]]), None),
    "KLDivergence": (M.KLDivergence, "onehot", "kl_divergence",
                     lambda t, p: (np.clip(t, EPS, 1) * np.log(np.clip(t, EPS, 1) / p)).sum(-1), None),
    "Poisson": (M.Poisson, "positive", "poisson", lambda t, p: (p - t * np.log(p + EPS)).mean(-1), None),
    "Hinge": (M.Hinge, "binary", "hinge", lambda t, p: np.maximum(1 - (2 * t - 1) * p, 0).mean(-1), None),
    "SquaredHinge": (M.SquaredHinge, "binary", "squared_hinge",
                     lambda t, p: (np.maximum(1 - (2 * t - 1) * p, 0) ** 2).mean(-1), None),
    "CategoricalHinge": (M.CategoricalHinge, "onehot", "categorical_hinge",
                         lambda t, p: np.maximum(((1 - t) * p).max(-1) - (t * p).sum(-1) + 1, 0), None),
}


@pytest.mark.parametrize("key", sorted(FORMULAS))
def test_mean_metric_classes_against_formulas_with_and_without_weights(key):
    make, kind, name, formula, final = FORMULAS[key]
    t, p = _data(kind)
    if key == "Accuracy":  # exact equality of values: predicted labels
        p = RNG.integers(0, 4, size=t.shape)
        formula = lambda t, p: (t == p).mean(-1).astype(float)  # noqa: E731
    w = RNG.uniform(0, 2, size=len(t))
    per = formula(t, p)
    final = final or (lambda v: v)
    metric = make()
    assert metric.name == name
    np.testing.assert_allclose(_in_batches(metric, t, p), final(per.mean()), rtol=1e-10)
    metric.reset_state()
    np.testing.assert_allclose(_in_batches(metric, t, p, w), final((w * per).sum() / w.sum()), rtol=1e-10)


def test_binary_accuracy_threshold_and_mean_sum():
    t, p = _data("binary", 20)
    assert _in_batches(M.BinaryAccuracy(threshold=0.7), t, p) == pytest.approx(((p > 0.7) == t).mean())
    values, w = RNG.normal(size=9), RNG.uniform(0, 2, size=9)
    mean, total = M.Mean(), M.Sum()
    for m in (mean, total):
        m.update_state(_t(values[:4]), _t(w[:4]))
        m.update_state(_t(values[4:]), _t(w[4:]))
    assert (mean.name, total.name) == ("mean", "sum")
    assert mean.result().item() == pytest.approx((w * values).sum() / w.sum(), rel=1e-12)
    assert total.result().item() == pytest.approx((w * values).sum(), rel=1e-12)


def _counts(t, p, thr, w=None):
    w = np.ones(len(t)) if w is None else w
    pos, predicted = t.ravel() > 0, p.ravel() > thr
    return {"tp": (w * (pos & predicted)).sum(), "fp": (w * (~pos & predicted)).sum(),
            "tn": (w * (~pos & ~predicted)).sum(), "fn": (w * (pos & ~predicted)).sum()}


def test_confusion_counts_precision_recall_against_formulas_and_sklearn():
    from sklearn.metrics import precision_score, recall_score

    t, p = _data("binary", 50)
    w = RNG.uniform(0, 2, size=50)
    for cls, key in ((M.TruePositives, "tp"), (M.FalsePositives, "fp"), (M.TrueNegatives, "tn"),
                     (M.FalseNegatives, "fn")):
        assert _in_batches(cls(), t, p, w) == pytest.approx(_counts(t, p, 0.5, w)[key], rel=1e-12)
        got = _in_batches(cls(thresholds=[0.2, 0.5, 0.8]), t, p)
        np.testing.assert_allclose(got, [_counts(t, p, x)[key] for x in (0.2, 0.5, 0.8)])
    labels, predicted = t.ravel().astype(int), (p.ravel() > 0.5).astype(int)
    assert _in_batches(M.Precision(), t, p) == pytest.approx(precision_score(labels, predicted), rel=1e-12)
    assert _in_batches(M.Recall(), t, p) == pytest.approx(recall_score(labels, predicted), rel=1e-12)
    assert _in_batches(M.Precision(), t, p, w) == pytest.approx(
        precision_score(labels, predicted, sample_weight=w), rel=1e-12)
    assert _in_batches(M.Recall(), t, p, w) == pytest.approx(recall_score(labels, predicted, sample_weight=w),
                                                              rel=1e-12)
    assert (M.Precision().name, M.Recall().name, M.TruePositives().name) == ("precision", "recall", "true_positives")


def test_auc_against_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    t = RNG.integers(0, 2, size=(400, 1)).astype(float)
    p = np.clip(0.35 * t + RNG.uniform(0, 0.65, size=t.shape), 0, 1)
    w = RNG.uniform(0.2, 2, size=400)
    roc = _in_batches(M.AUC(num_thresholds=2000), t, p, sizes=(77, 123, 200))
    assert roc == pytest.approx(roc_auc_score(t.ravel(), p.ravel()), abs=2e-3)
    roc_w = _in_batches(M.AUC(num_thresholds=2000), t, p, w, sizes=(77, 123, 200))
    assert roc_w == pytest.approx(roc_auc_score(t.ravel(), p.ravel(), sample_weight=w), abs=2e-3)
    pr = _in_batches(M.AUC(num_thresholds=2000, curve="PR"), t, p, sizes=(77, 123, 200))
    assert pr == pytest.approx(average_precision_score(t.ravel(), p.ravel()), abs=5e-3)
    assert M.AUC().name == "auc" and len(M.AUC().thresholds) == 200


CONFUSION_VS_KERAS = [
    ("AUC", {}), ("AUC", {"curve": "PR"}), ("AUC", {"num_thresholds": 7}),
    ("AUC", {"summation_method": "minoring"}), ("AUC", {"curve": "PR", "summation_method": "majoring"}),
    ("AUC", {"thresholds": [0.1, 0.33, 0.6, 0.9]}), ("AUC", {"from_logits": True}),
    ("AUC", {"multi_label": True}), ("AUC", {"multi_label": True, "curve": "PR", "label_weights": [1, 2, 0.5, 1]}),
    ("Precision", {}), ("Recall", {}), ("Precision", {"thresholds": [0.0, 0.5, 1.0]}),
    ("Recall", {"thresholds": [0.3, 0.7]}), ("Precision", {"top_k": 2}), ("Recall", {"top_k": 2}),
    ("Precision", {"class_id": 1}), ("Recall", {"class_id": 2, "thresholds": 0.3}),
    ("TruePositives", {"thresholds": [0.25, 0.5]}), ("FalseNegatives", {}),
]


@pytest.mark.parametrize("name,kwargs", CONFUSION_VS_KERAS, ids=lambda v: str(v))
def test_confusion_metrics_equal_keras(name, kwargs):
    keras = _keras()
    t = RNG.integers(0, 2, size=(60, 4)).astype(np.float32)
    p = np.clip(0.3 * t + RNG.uniform(0, 0.7, size=t.shape), 0, 1).astype(np.float32)
    p[0, 0], p[1, 1], p[2, 2] = 0.0, 1.0, 0.5  # boundaries
    if kwargs.get("from_logits"):
        p = (p - 0.5) * 6
    w = RNG.uniform(0.1, 2, size=60).astype(np.float32)
    ours, theirs = getattr(M, name)(**kwargs), getattr(keras.metrics, name)(**kwargs)
    for sl in (slice(0, 17), slice(17, 60)):
        theirs.update_state(t[sl], p[sl], sample_weight=w[sl])
    expected = np.asarray(keras.ops.convert_to_numpy(theirs.result()), dtype=np.float64)
    got = _in_batches(ours, t, p, w, sizes=(17, 43))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["BinaryAccuracy", "RootMeanSquaredError", "CosineSimilarity", "LogCoshError",
                                  "SparseTopKCategoricalAccuracy", "CategoricalHinge"])
def test_mean_metrics_equal_keras(name):
    keras = _keras()
    if name in ("BinaryAccuracy",):
        t, p = _data("binary", 30)
    elif name == "SparseTopKCategoricalAccuracy":
        t, p = _data("sparse", 30)
    elif name == "CategoricalHinge":
        t, p = _data("onehot", 30)
    else:
        t, p = _data("real", 30)
    w = RNG.uniform(0.1, 2, size=30)
    kwargs = {"k": 2} if "TopK" in name else {}
    theirs = getattr(keras.metrics, name)(**kwargs)
    theirs.update_state(t.astype(np.float32), p.astype(np.float32), sample_weight=w.astype(np.float32))
    expected = float(keras.ops.convert_to_numpy(theirs.result()))
    ours = getattr(M, name)(**kwargs)
    assert ours.name == theirs.name
    assert float(_in_batches(ours, t, p, w)) == pytest.approx(expected, rel=1e-5)


# -- user metrics, the Keras guide's pattern ----------------------------------------------------------------
class CategoricalTruePositives(M.Metric):
    """The Keras guide's example: how many samples were classified correctly (a sum state)."""

    def __init__(self, name="categorical_true_positives", **kwargs):
        super().__init__(name=name, **kwargs)
        self.true_positives = self.add_variable(shape=(), name="ctp", initializer="zeros")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = y_pred.argmax(dim=1).reshape(-1, 1)
        values = (y_true.reshape(-1, 1).long() == y_pred).to(torch.float64)
        if sample_weight is not None:
            values = values * sample_weight.reshape(-1, 1).to(torch.float64)
        self.true_positives.assign_add(values.sum())

    def result(self):
        return self.true_positives.value

    def reset_state(self):
        self.true_positives.assign(0.0)


class MeanAbsoluteWithCount(M.Metric):
    """A user metric with a vector state and a scalar count, added with += and add_weight."""

    def __init__(self, name="mean_abs_per_column"):
        super().__init__(name=name)
        self.total = self.add_weight(shape=(2,), name="total")
        self.count = self.add_weight(shape=(), name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.total += (y_pred - y_true).abs().sum(0)
        self.count += y_pred.shape[0]

    def result(self):
        return (self.total / self.count).sum()


class Identity(nn.Module):
    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1, dtype=F64))

    def forward(self, x):
        return x + 0.0 * self.unused


def test_user_metric_in_fit_is_copied_and_exact():
    labels = RNG.integers(0, 3, size=11)
    probs = _softmax(RNG.normal(size=(11, 3)))
    user = CategoricalTruePositives()
    model = frozen_model(Identity(), loss="sparse_categorical_crossentropy", metrics=[user])
    history = model.fit(probs, labels, batch_size=4, epochs=2, verbose=0, validation_data=(probs, labels))
    correct = float((probs.argmax(-1) == labels).sum())
    assert history.history["categorical_true_positives"] == [correct, correct]
    assert history.history["val_categorical_true_positives"] == [correct, correct]
    assert user.true_positives.item() == 0.0  # the object given to compile is not updated
    assert model.metrics_names == ["loss", "categorical_true_positives"]


def test_metric_subclass_needs_update_state_and_super_init():
    class NoUpdate(M.Metric):
        def result(self):
            return torch.zeros(())

    with pytest.raises(NotImplementedError, match=r"NoUpdate must implement update_state\(y_true, y_pred"):
        NoUpdate().update_state(torch.zeros(2), torch.zeros(2))

    class NoSuper(M.Metric):
        def __init__(self):
            self.v = self.add_variable()

    with pytest.raises(RuntimeError, match="super"):
        NoSuper()


# -- exact on N ranks ------------------------------------------------------------------------------------------
def _ranked_fit(n: int, batch_size: int):
    import dfit as _dfit
    from core_helpers import frozen

    rng = np.random.default_rng(3)
    t = rng.integers(0, 3, size=n)
    z = rng.normal(size=(n, 3))
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    binary = (t == 1).astype(float).reshape(n, 1)
    w = rng.uniform(0.2, 2, size=n)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Parameter(torch.zeros(1, dtype=F64))

        def forward(self, x):
            x = x + 0.0 * self.unused
            return [x, x[:, 1:2]]

    model = _dfit.Model(Two())
    model.compile(optimizer=frozen, loss=["sparse_categorical_crossentropy", "binary_crossentropy"],
                  metrics=[[CategoricalTruePositives(), "accuracy"],
                           [M.AUC(), M.AUC(curve="PR", num_thresholds=50), M.Precision(thresholds=[0.3, 0.5]),
                            "recall", MeanAbsoluteWithCount()]],
                  weighted_metrics=[[CategoricalTruePositives()], [M.AUC(), "precision"]])
    x = np.concatenate([p[:, :1], p[:, 1:2], p[:, 2:]], axis=1)
    history = model.fit(x, [t, binary], sample_weight=w, batch_size=batch_size, epochs=2, verbose=0,
                        validation_split=0.3)
    return history.history, model.metrics_names


def test_confusion_and_user_metrics_equal_on_1_2_3_ranks():
    one = run_ranks(_ranked_fit, 1, 37, 8)[0]
    many = run_ranks(_ranked_fit, 2, 37, 8) + run_ranks(_ranked_fit, 3, 37, 8)
    history, names = one
    assert names[:3] == ["loss", "output_1_loss", "output_2_loss"]
    assert "output_1_weighted_categorical_true_positives" in names and "output_2_weighted_auc" in names
    for h, n in many:
        assert n == names
        assert list(h) == list(history)
        for key in history:
            np.testing.assert_allclose(np.asarray(h[key], dtype=float), np.asarray(history[key], dtype=float),
                                       rtol=1e-10, atol=1e-12, err_msg=key)
    # and the single-rank values are right
    rng = np.random.default_rng(3)
    t = rng.integers(0, 3, size=37)
    z = rng.normal(size=(37, 3))
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    train = slice(0, int(37 * (1 - 0.3)))  # Keras' split: the first rows train
    assert history["output_1_categorical_true_positives"][0] == float((p[train].argmax(-1) == t[train]).sum())


def test_categorical_true_positives_exact_on_2_ranks():
    def expected():
        rng = np.random.default_rng(3)
        t = rng.integers(0, 3, size=37)
        z = rng.normal(size=(37, 3))
        return t, np.exp(z) / np.exp(z).sum(-1, keepdims=True)

    one = run_ranks(_guide_fit, 1)[0]
    two = run_ranks(_guide_fit, 2)
    t, p = expected()
    assert one["categorical_true_positives"] == [float((p.argmax(-1) == t).sum())] * 2
    for h in two:
        assert h["categorical_true_positives"] == one["categorical_true_positives"]   # counts: exact
        np.testing.assert_allclose(h["loss"], one["loss"], rtol=1e-12)     # sums in another order: rounding


def _guide_fit():
    import dfit as _dfit
    from core_helpers import frozen

    rng = np.random.default_rng(3)
    t = rng.integers(0, 3, size=37)
    z = rng.normal(size=(37, 3))
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    model = _dfit.Model(Identity())
    model.compile(optimizer=frozen, loss="sparse_categorical_crossentropy", metrics=[CategoricalTruePositives()])
    return model.fit(p, t, batch_size=5, epochs=2, verbose=0).history


# -- Keras 3 naming and resolution ------------------------------------------------------------------------------
class AB(nn.Module):
    """Two outputs like the Keras reference model: a (softmax over 3) and b (one unit)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1, dtype=F64))

    def forward(self, x):
        x = x + 0.0 * self.unused
        return {"a": torch.softmax(x[:, :3], -1), "b": x[:, 3:]}


def _ab_data(n=10):
    x = RNG.normal(size=(n, 4))
    y = {"a": RNG.integers(0, 3, size=n), "b": RNG.uniform(size=(n, 1))}
    return x, y


def _ab_keys(**compile_kwargs):
    x, y = _ab_data()
    model = frozen_model(AB(), loss={"a": "sparse_categorical_crossentropy", "b": "mse"}, **compile_kwargs)
    history = model.fit(x, y, epochs=1, verbose=0, batch_size=4)
    return list(history.history), model


def test_flat_metrics_list_is_spread_by_position_over_outputs():
    keys, model = _ab_keys(metrics=["accuracy", "mae"])
    assert keys == ["loss", "a_loss", "b_loss", "a_accuracy", "b_mae"]
    assert model.metrics_names == keys
    with pytest.raises(ValueError, match="should .*match the output structure of the model"):
        _ab_keys(metrics=["mae"])
    with pytest.raises(ValueError, match="should .*match the output structure of the model"):
        _ab_keys(metrics=["mae", "mse", "accuracy"])
    keys, _ = _ab_keys(metrics=[["accuracy"], ["mae", "mse"]])
    assert keys == ["loss", "a_loss", "b_loss", "a_accuracy", "b_mae", "b_mse"]
    keys, _ = _ab_keys(metrics={"b": ["mae"]})
    assert keys == ["loss", "a_loss", "b_loss", "b_mae"]


def test_weighted_metric_names_as_keras_3():
    keys, _ = _ab_keys(metrics=[["accuracy"], ["mae"]], weighted_metrics=[["accuracy"], ["mse"]])
    assert keys == ["loss", "a_loss", "b_loss", "a_accuracy", "b_mae", "a_weighted_accuracy", "b_mse"]
    x = RNG.normal(size=(8, 1))
    model = frozen_model(Identity(), metrics=["mae"], weighted_metrics=["mae"])
    assert model.metrics_names == ["loss"]
    assert list(model.fit(x, x, epochs=1, verbose=0).history) == ["loss", "mae", "weighted_mae"]
    assert model.metrics_names == ["loss", "mae", "weighted_mae"]
    model = frozen_model(Identity(), metrics=["mae", "mae"])  # a repeated plain metric: Keras adds _1
    assert list(model.fit(x, x, epochs=1, verbose=0).history) == ["loss", "mae", "mae_1"]


def test_keras_3_gives_the_same_two_output_keys():
    keras = _keras()
    inp = keras.Input((4,))
    a = keras.layers.Dense(3, activation="softmax", name="a")(inp)
    b = keras.layers.Dense(1, name="b")(inp)
    kmodel = keras.Model(inp, [a, b])
    x, y = _ab_data()
    kmodel.compile(optimizer="sgd", loss=["sparse_categorical_crossentropy", "mse"],
                   metrics=[["accuracy"], ["mae"]], weighted_metrics=[["accuracy"], ["mse"]])
    logs = kmodel.fit(x, [y["a"], y["b"]], epochs=1, verbose=0).history
    ours, _ = _ab_keys(metrics=[["accuracy"], ["mae"]], weighted_metrics=[["accuracy"], ["mse"]])
    assert sorted(logs) == sorted(ours)
    kmodel.compile(optimizer="sgd", loss=["sparse_categorical_crossentropy", "mse"], metrics=["accuracy", "mae"])
    logs = kmodel.fit(x, [y["a"], y["b"]], epochs=1, verbose=0).history
    assert sorted(logs) == sorted(_ab_keys(metrics=["accuracy", "mae"])[0])


def _accuracy_of(loss, p, t):
    model = frozen_model(Identity(), loss=loss, metrics=["acc"])
    return model.fit(p, t, epochs=1, verbose=0, batch_size=4).history["acc"][0]


def test_accuracy_resolved_from_output_and_target_shapes():
    probs = _softmax(RNG.normal(size=(12, 3)))
    labels = RNG.integers(0, 3, size=12)
    assert _accuracy_of("categorical_crossentropy", probs, np.eye(3)[labels]) == pytest.approx(
        (probs.argmax(-1) == labels).mean())
    assert _accuracy_of("sparse_categorical_crossentropy", probs, labels) == pytest.approx(
        (probs.argmax(-1) == labels).mean())
    assert _accuracy_of("sparse_categorical_crossentropy", probs, labels.reshape(-1, 1)) == pytest.approx(
        (probs.argmax(-1) == labels).mean())
    # multi-label sigmoid outputs with binary_crossentropy and (b, k>1) targets: Keras 3 picks CATEGORICAL accuracy
    multi = RNG.integers(0, 2, size=(12, 3)).astype(float)
    sig = RNG.uniform(size=(12, 3))
    got = _accuracy_of("binary_crossentropy", sig, multi)
    assert got == pytest.approx((sig.argmax(-1) == multi.argmax(-1)).mean())
    assert got != pytest.approx(((sig > 0.5) == multi).mean())
    # one unit: binary accuracy at 0.5, also for logits
    z = np.array([[-0.5], [0.3], [2.0], [-2.0], [0.1], [0.4]])
    t = np.array([[0.0], [1.0], [1.0], [1.0], [1.0], [0.0]])
    assert _accuracy_of(dfit.losses.BinaryCrossentropy(from_logits=True), z, t) == pytest.approx(
        ((z > 0.5) == t).mean())


def test_accuracy_resolution_equals_keras_3():
    keras = _keras()
    from keras.src.trainers.compile_utils import get_metric

    cases = [((12, 3), (12, 3)), ((12,), (12, 3)), ((12, 1), (12, 3)), ((12, 1), (12, 1)), ((12,), (12, 1))]
    expected_kind = {"BinaryAccuracy": M.binary_accuracy, "SparseCategoricalAccuracy": M.sparse_categorical_accuracy,
                     "CategoricalAccuracy": M.categorical_accuracy}
    for t_shape, p_shape in cases:
        kind = type(get_metric("accuracy", np.zeros(t_shape), np.zeros(p_shape))).__name__
        ours = M.get("accuracy")
        ours.update_state(torch.zeros(t_shape), torch.rand(p_shape))
        assert ours._fn is expected_kind[kind], (t_shape, p_shape, kind)
        assert ours.name == "accuracy"


def test_string_names_for_classes_and_unknown_names():
    for name, cls in (("auc", M.AUC), ("AUC", M.AUC), ("precision", M.Precision), ("recall", M.Recall),
                      ("true_positives", M.TruePositives), ("false_negatives", M.FalseNegatives),
                      ("rmse", M.RootMeanSquaredError), ("Precision", M.Precision)):
        m = M.get(name)
        assert isinstance(m, cls) and m.name == name
    with pytest.raises(ValueError, match="Unknown metric 'aucc'"):
        M.get("aucc")
    with pytest.raises(TypeError, match="MeanMetricWrapper"):
        M.get(M.Mean())


def test_torchmetrics_with_sample_weights_where_update_takes_them():
    torchmetrics = pytest.importorskip("torchmetrics")
    values, w = RNG.normal(size=(9, 1)), RNG.uniform(0.1, 2, size=9)

    class WeightedMAE(torchmetrics.Metric):
        def __init__(self):
            super().__init__()
            self.add_state("total", default=torch.tensor(0.0, dtype=F64), dist_reduce_fx="sum")
            self.add_state("weight", default=torch.tensor(0.0, dtype=F64), dist_reduce_fx="sum")

        def update(self, preds, target, sample_weight=None):
            sw = torch.ones(len(preds), dtype=F64) if sample_weight is None else sample_weight
            self.total += (sw * (preds - target).abs().reshape(len(preds))).sum()
            self.weight += sw.sum()

        def compute(self):
            return self.total / self.weight

    model = frozen_model(Identity(), metrics=[WeightedMAE()], weighted_metrics=[WeightedMAE()])
    logs = model.fit(values, np.zeros((9, 1)), sample_weight=w, batch_size=4, epochs=1, verbose=0).history
    assert list(logs) == ["loss", "weighted_mae", "weighted_weighted_mae"]
    assert logs["weighted_mae"][0] == pytest.approx(np.abs(values).mean(), rel=1e-12)
    assert logs["weighted_weighted_mae"][0] == pytest.approx((w * np.abs(values[:, 0])).sum() / w.sum(), rel=1e-12)
    plain = torchmetrics.MeanAbsoluteError()
    with pytest.raises(ValueError, match="takes no sample weights"):
        frozen_model(Identity(), weighted_metrics=[plain]).fit(values, values, epochs=1, verbose=0)


# -- the state API (found by mutation testing, see tests/README.md) ----------------------------------------------
def test_sum_keeps_its_name_and_dtype_and_casts_what_it_adds():
    s = M.Sum(name="total_seen", dtype="int64")
    assert s.name == "total_seen" and s.total.dtype == torch.int64
    s.update_state(torch.tensor([1.0, 2.0, 4.0]))
    assert s.result().item() == 7 and s.result().dtype == torch.int64
    assert M.Sum().name == "sum" and M.Sum().total.dtype == torch.float64


def test_variable_assign_add_casts_to_the_state_dtype():
    class Counter(M.Metric):
        def __init__(self):
            super().__init__(name="counter")
            self.n = self.add_variable(dtype="int64", name="n")

        def update_state(self, y_true, y_pred, sample_weight=None):
            self.n.assign_add(torch.tensor(float(len(y_true))))

        def result(self):
            return self.n.value

    c = Counter()
    c.update_state(torch.zeros(3), torch.zeros(3))
    c.n.assign_add(2.0)
    assert c.result().item() == 5 and c.n.dtype == torch.int64
    c.n.assign(1.0)
    assert c.result().item() == 1
