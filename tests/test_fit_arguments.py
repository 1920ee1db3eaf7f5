"""Every argument of ``Model.fit``, each checked against values computed by hand (single process)."""
from __future__ import annotations

import io
import re
import sys

import numpy as np
import pytest
import torch
from torch import nn

import dfit
from dfit.callbacks import Callback, LambdaCallback, ProgbarLogger
from core_helpers import F64, Recorder, fixed_linear, frozen, frozen_model, mse_rows, row_ids

pytestmark = pytest.mark.timeout(60)


def _xy(n, seed=0, d=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(n, 1))


def _linear_pred(x, w=1.0, b=0.0):
    return np.asarray(x, np.float64) * w + b


# -- batch_size, epochs, initial_epoch --------------------------------------------------------------------
def test_batch_size_defaults_to_32():
    rec = Recorder()
    model = frozen_model(rec)
    history = model.fit(row_ids(70), np.zeros((70, 1)), epochs=1, verbose=0, shuffle=False)
    assert [len(b) for b in rec.rows(True)] == [32, 32, 6]
    assert history.params["steps"] == 3
    assert history.params["batch_size"] == 32


def test_batch_size_sets_global_batch_and_keeps_last_partial_batch():
    rec = Recorder()
    model = frozen_model(rec)
    model.fit(row_ids(10), np.zeros((10, 1)), batch_size=4, epochs=1, verbose=0, shuffle=False)
    assert rec.rows(True) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_epochs_defaults_to_10():
    model = frozen_model(Recorder())
    history = model.fit(row_ids(4), np.zeros((4, 1)), verbose=0)
    assert history.epoch == list(range(10))
    assert len(history.history["loss"]) == 10
    assert history.params["epochs"] == 10


def test_initial_epoch_means_epochs_is_the_final_epoch():
    model = frozen_model(Recorder())
    history = model.fit(row_ids(4), np.zeros((4, 1)), epochs=5, initial_epoch=2, verbose=0)
    assert history.epoch == [2, 3, 4]
    assert len(history.history["loss"]) == 3


def test_initial_epoch_equal_to_epochs_trains_nothing():
    rec = Recorder()
    history = frozen_model(rec).fit(row_ids(4), np.zeros((4, 1)), epochs=3, initial_epoch=3, verbose=0)
    assert history.epoch == [] and history.history == {} and rec.calls == []


def test_model_history_is_the_returned_history():
    model = frozen_model(Recorder())
    history = model.fit(row_ids(4), np.zeros((4, 1)), epochs=1, verbose=0)
    assert model.history is history


# -- loss values: sample_weight, class_weight, epoch mean -------------------------------------------------
def test_epoch_loss_is_batch_size_weighted_mean_of_batch_losses():
    x, y = _xy(10)
    w = np.linspace(0.5, 2.0, 10)
    model = frozen_model(Recorder(w=0.7, b=0.1))
    seen = []
    cb = LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(dict(logs)))
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False, sample_weight=w, callbacks=[cb])
    per_sample = w * mse_rows(_linear_pred(x, 0.7, 0.1), y)
    batch_losses = [per_sample[0:4].sum() / 4, per_sample[4:8].sum() / 4, per_sample[8:10].sum() / 2]
    expected = (4 * batch_losses[0] + 4 * batch_losses[1] + 2 * batch_losses[2]) / 10
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-12)
    # running loss in the batch logs: the mean over the samples seen so far in the epoch
    assert seen[0]["loss"] == pytest.approx(batch_losses[0], rel=1e-12)
    assert seen[1]["loss"] == pytest.approx(per_sample[:8].sum() / 8, rel=1e-12)
    assert seen[2]["loss"] == pytest.approx(expected, rel=1e-12)


def test_sample_weight_loss_is_sum_of_weighted_losses_over_batch_size_in_the_gradient():
    """One SGD epoch over two batches, computed by a plain torch loop: sum(w * l) / n per batch."""
    x = np.array([[1.0], [2.0], [3.0]])
    y = np.array([[1.0], [0.0], [2.0]])
    sw = np.array([1.0, 2.0, 3.0])
    lr = 0.1
    module = fixed_linear([[0.5]], [0.25])
    model = dfit.Model(module)
    model.compile(optimizer=lambda p: torch.optim.SGD(p, lr=lr), loss="mse")
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, sample_weight=sw)

    ref = fixed_linear([[0.5]], [0.25])
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    xt, yt, wt = (torch.tensor(a, dtype=F64) for a in (x, y, sw))
    losses, sizes = [], []
    for rows in (slice(0, 2), slice(2, 3)):
        opt.zero_grad()
        per = ((ref(xt[rows]) - yt[rows]) ** 2).mean(dim=-1)
        loss = (per * wt[rows]).sum() / len(per)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        sizes.append(len(per))
    assert torch.allclose(module.weight, ref.weight, rtol=1e-12, atol=0)
    assert torch.allclose(module.bias, ref.bias, rtol=1e-12, atol=0)
    assert history.history["loss"][0] == pytest.approx(np.dot(losses, sizes) / 3, rel=1e-12)


def test_class_weight_multiplies_per_sample_losses():
    x = np.linspace(-1, 1, 8).reshape(8, 1)
    labels = np.array([0, 1, 1, 2, 0, 2, 1, 0])
    cw = {0: 1.0, 1: 3.0, 2: 0.5}
    model = frozen_model(Recorder(w=0.3, b=0.2))
    history = model.fit(x, labels.reshape(8, 1).astype(np.float64), epochs=1, verbose=0, class_weight=cw)
    per = mse_rows(_linear_pred(x, 0.3, 0.2), labels)
    expected = (np.array([cw[c] for c in labels]) * per).sum() / 8
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-12)


def test_class_weight_missing_classes_weigh_one():
    x = np.linspace(-1, 1, 6).reshape(6, 1)
    labels = np.array([0, 1, 2, 0, 1, 2])
    model = frozen_model(Recorder(w=0.3))
    history = model.fit(x, labels, epochs=1, verbose=0, class_weight={1: 4.0})
    per = mse_rows(_linear_pred(x, 0.3), labels)
    expected = (np.where(labels == 1, 4.0, 1.0) * per).sum() / 6
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-12)


def test_class_weight_uses_argmax_of_one_hot_labels():
    torch.manual_seed(0)
    logits = np.random.default_rng(1).normal(size=(6, 3))
    labels = np.array([0, 2, 1, 1, 0, 2])
    one_hot = np.eye(3)[labels]
    cw = {0: 2.0, 1: 1.0, 2: 5.0}
    module = fixed_linear(np.eye(3), np.zeros(3))
    model = frozen_model(module, loss=dfit.losses.CategoricalCrossentropy(from_logits=True))
    history = model.fit(logits, one_hot, epochs=1, verbose=0, class_weight=cw)
    logp = torch.log_softmax(torch.tensor(logits), dim=-1).numpy()
    per = -(one_hot * logp).sum(-1)
    expected = (np.array([cw[c] for c in labels]) * per).sum() / 6
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-12)


def test_class_weight_uses_argmax_of_integer_one_hot_labels():
    """One-hot labels stored as integers are one-hot rows too (Keras takes argmax whatever the dtype)."""
    logits = np.random.default_rng(1).normal(size=(6, 3))
    labels = np.array([0, 2, 1, 1, 0, 2])
    one_hot = np.eye(3, dtype=np.int64)[labels]
    cw = {0: 2.0, 1: 1.0, 2: 5.0}
    model = frozen_model(fixed_linear(np.eye(3), np.zeros(3)),
                         loss=dfit.losses.CategoricalCrossentropy(from_logits=True))
    history = model.fit(logits, one_hot, epochs=1, verbose=0, class_weight=cw)
    per = -(one_hot * torch.log_softmax(torch.tensor(logits), dim=-1).numpy()).sum(-1)
    expected = (np.array([cw[c] for c in labels]) * per).sum() / 6
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-12)


def test_class_weight_and_sample_weight_multiply():
    x = np.linspace(-1, 1, 7).reshape(7, 1)
    labels = np.array([0, 1, 1, 0, 1, 0, 0])
    sw = np.array([1.0, 0.5, 2.0, 3.0, 1.0, 0.25, 1.5])
    cw = {0: 2.0, 1: 0.5}
    model = frozen_model(Recorder(w=1.5, b=-0.5))
    history = model.fit(x, labels, epochs=1, verbose=0, batch_size=3, class_weight=cw, sample_weight=sw)
    per = mse_rows(_linear_pred(x, 1.5, -0.5), labels)
    expected = (sw * np.array([cw[c] for c in labels]) * per).sum() / 7
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-12)


def test_class_weight_is_not_applied_to_validation():
    x = np.linspace(-1, 1, 10).reshape(10, 1)
    labels = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 0])
    cw = {0: 10.0, 1: 0.1}
    model = frozen_model(Recorder(w=0.5))
    history = model.fit(x, labels, epochs=1, verbose=0, class_weight=cw, validation_split=0.4)
    per = mse_rows(_linear_pred(x, 0.5), labels)
    train_expected = (np.array([cw[c] for c in labels[:6]]) * per[:6]).sum() / 6
    assert history.history["loss"][0] == pytest.approx(train_expected, rel=1e-12)
    assert history.history["val_loss"][0] == pytest.approx(per[6:].mean(), rel=1e-12)
    # and with validation_data
    history = model.fit(x[:6], labels[:6], epochs=1, verbose=0, class_weight=cw, validation_data=(x[6:], labels[6:]))
    assert history.history["val_loss"][0] == pytest.approx(per[6:].mean(), rel=1e-12)


def test_class_weight_rejects_bad_types():
    model = frozen_model(Recorder())
    with pytest.raises(TypeError, match="class_weight"):
        model.fit(row_ids(4), np.array([0, 1, 0, 1]), epochs=1, verbose=0, class_weight=[1.0, 2.0])


def test_temporal_sample_weight():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 4, 1))  # (samples, timesteps, features)
    y = rng.normal(size=(5, 4, 1))
    sw = rng.uniform(0, 2, size=(5, 4))
    model = frozen_model(fixed_linear([[0.8]], [0.1]), sample_weight_mode="temporal")
    history = model.fit(x, y, epochs=1, verbose=0, batch_size=2, shuffle=False, sample_weight=sw)
    per = ((x * 0.8 + 0.1 - y) ** 2).mean(-1)  # (samples, timesteps)
    expected = (sw * per).sum() / (5 * 4)  # Keras: sum(w * l) / number of loss elements
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-12)


def test_temporal_sample_weight_requires_the_mode_and_the_shape():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5, 4, 1)), rng.normal(size=(5, 4, 1))
    model = frozen_model(fixed_linear([[0.8]], [0.1]))
    with pytest.raises(ValueError, match="temporal"):
        model.fit(x, y, epochs=1, verbose=0, sample_weight=np.ones((5, 4)))
    model = frozen_model(fixed_linear([[0.8]], [0.1]), sample_weight_mode="temporal")
    with pytest.raises(ValueError, match="timesteps"):
        model.fit(x, y, epochs=1, verbose=0, sample_weight=np.ones(5))


# -- validation_split / validation_data --------------------------------------------------------------------
@pytest.mark.parametrize("n,f,n_val", [(10, 0.2, 2), (10, 0.33, 4), (7, 0.5, 4), (3, 0.1, 1), (100, 0.25, 25)])
def test_validation_split_takes_the_last_rows_before_shuffling(n, f, n_val):
    rec = Recorder()
    model = frozen_model(rec)
    assert n - int(n * (1 - f)) == n_val
    model.fit(row_ids(n), np.zeros((n, 1)), epochs=2, batch_size=3, verbose=0, shuffle=True, seed=5,
              validation_split=f)
    n_train = n - n_val
    train_epochs = rec.rows(True)
    seen_train = sorted(r for batch in train_epochs for r in batch)
    assert seen_train == sorted(list(range(n_train)) * 2)
    val_rows = [r for batch in rec.rows(False) for r in batch]
    assert val_rows == list(range(n_train, n)) * 2  # validation is never shuffled


def test_validation_split_val_loss_by_hand_and_split_sample_weights():
    x, y = _xy(10, seed=4)
    sw = np.arange(1.0, 11.0)
    model = frozen_model(Recorder(w=-0.4, b=0.3))
    history = model.fit(x, y, epochs=1, verbose=0, validation_split=0.3, sample_weight=sw)
    per = mse_rows(_linear_pred(x, -0.4, 0.3), y)
    assert history.history["loss"][0] == pytest.approx((sw[:7] * per[:7]).sum() / 7, rel=1e-12)
    # the held-out weights weigh val_loss, as in Keras
    assert history.history["val_loss"][0] == pytest.approx((sw[7:] * per[7:]).sum() / 3, rel=1e-12)


def test_validation_split_agrees_with_evaluate_on_the_last_rows():
    x, y = _xy(13, seed=6, d=2)
    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(2, 3, dtype=F64), nn.Tanh(), nn.Linear(3, 1, dtype=F64)])
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    history = model.fit(x, y, epochs=2, batch_size=4, verbose=0, validation_split=0.25, seed=1)
    n_train = int(13 * 0.75)
    val_loss, val_mae = model.evaluate(x[n_train:], y[n_train:], verbose=0)
    assert history.history["val_loss"][-1] == pytest.approx(val_loss, rel=1e-12)
    assert history.history["val_mae"][-1] == pytest.approx(val_mae, rel=1e-12)


@pytest.mark.parametrize("split", [1.0, -0.1, 1.5, "0.2"])
def test_validation_split_outside_unit_interval_is_rejected(split):
    model = frozen_model(Recorder())
    with pytest.raises(ValueError, match="validation_split"):
        model.fit(row_ids(10), np.zeros((10, 1)), epochs=1, verbose=0, validation_split=split)


@pytest.mark.parametrize("n,split,side", [(1, 0.5, "training"), (5, 1e-17, "validation"), (2, 0.9, "training")])
def test_validation_split_leaving_no_rows_is_rejected(n, split, side):
    model = frozen_model(Recorder())
    with pytest.raises(ValueError, match=f"no {side}"):
        model.fit(row_ids(n), np.zeros((n, 1)), epochs=1, verbose=0, validation_split=split)


def test_validation_data_two_tuple():
    x, y = _xy(6, seed=7)
    xv, yv = _xy(5, seed=8)
    model = frozen_model(Recorder(w=0.9, b=-0.2), metrics=["mae"])
    history = model.fit(x, y, epochs=2, verbose=0, validation_data=(xv, yv))
    pv = _linear_pred(xv, 0.9, -0.2)
    assert history.history["val_loss"] == pytest.approx([mse_rows(pv, yv).mean()] * 2, rel=1e-12)
    assert history.history["val_mae"] == pytest.approx([np.abs(pv - yv).mean()] * 2, rel=1e-12)


def test_validation_data_three_tuple_weights_val_loss():
    x, y = _xy(6, seed=7)
    xv, yv = _xy(5, seed=8)
    wv = np.array([0.0, 1.0, 2.0, 0.5, 3.0])
    model = frozen_model(Recorder(w=0.9, b=-0.2))
    history = model.fit(x, y, epochs=1, verbose=0, validation_data=(xv, yv, wv))
    per = mse_rows(_linear_pred(xv, 0.9, -0.2), yv)
    assert history.history["val_loss"][0] == pytest.approx((wv * per).sum() / 5, rel=1e-12)


def test_validation_data_takes_precedence_over_validation_split():
    rec = Recorder()
    model = frozen_model(rec)
    model.fit(row_ids(10), np.zeros((10, 1)), epochs=1, verbose=0, shuffle=False,
              validation_split=0.5, validation_data=(row_ids(3) + 100, np.zeros((3, 1))))
    assert rec.rows(True) == [list(range(10))]
    assert rec.rows(False) == [[100, 101, 102]]


@pytest.mark.parametrize("bad", [(np.zeros((2, 1)),), (np.zeros((2, 1)),) * 4, np.zeros((2, 1)), "data"])
def test_validation_data_of_the_wrong_form_is_rejected(bad):
    model = frozen_model(Recorder())
    with pytest.raises(ValueError, match="validation_data"):
        model.fit(row_ids(4), np.zeros((4, 1)), epochs=1, verbose=0, validation_data=bad)


def test_validation_batch_size():
    rec = Recorder()
    model = frozen_model(rec)
    model.fit(row_ids(4), np.zeros((4, 1)), epochs=1, verbose=0, batch_size=4,
              validation_data=(row_ids(7), np.zeros((7, 1))), validation_batch_size=3)
    assert rec.rows(False) == [[0, 1, 2], [3, 4, 5], [6]]
    rec.calls.clear()
    model.fit(row_ids(4), np.zeros((4, 1)), epochs=1, verbose=0, batch_size=5,
              validation_data=(row_ids(7), np.zeros((7, 1))))
    assert rec.rows(False) == [[0, 1, 2, 3, 4], [5, 6]]  # defaults to batch_size


def test_validation_steps_bounds_validation_on_arrays():
    xv, yv = _xy(10, seed=9)
    rec = Recorder(w=2.0)
    model = frozen_model(rec)
    history = model.fit(row_ids(4), np.zeros((4, 1)), epochs=1, verbose=0, validation_data=(xv, yv),
                        validation_batch_size=3, validation_steps=2)
    assert [len(b) for t, b in rec.calls if not t] == [3, 3]
    assert history.history["val_loss"][0] == pytest.approx(mse_rows(2.0 * xv[:6], yv[:6]).mean(), rel=1e-12)


@pytest.mark.parametrize("freq,val_epochs", [(1, [0, 1, 2, 3]), (2, [1, 3]), (3, [2]), ([1, 4], [0, 3]),
                                             ((2,), [1])])
def test_validation_freq(freq, val_epochs):
    model = frozen_model(Recorder())
    at = []
    cb = LambdaCallback(on_epoch_end=lambda epoch, logs: at.append(epoch) if "val_loss" in logs else None)
    history = model.fit(row_ids(4), np.zeros((4, 1)), epochs=4, verbose=0, validation_split=0.5,
                        validation_freq=freq, callbacks=[cb])
    assert at == val_epochs
    assert len(history.history["val_loss"]) == len(val_epochs)
    assert len(history.history["loss"]) == 4


@pytest.mark.parametrize("freq", [0, -1, "2", 1.5])
def test_bad_validation_freq(freq):
    model = frozen_model(Recorder())
    with pytest.raises(ValueError, match="validation_freq"):
        model.fit(row_ids(4), np.zeros((4, 1)), epochs=1, verbose=0, validation_split=0.5, validation_freq=freq)


# -- steps_per_epoch ---------------------------------------------------------------------------------------
def _rows_per_epoch(n, batch_size, epochs, steps):
    """Which rows each epoch reads (x = row ids), recorded at every epoch start."""
    rec = Recorder()
    marks = []
    cb = dfit.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: marks.append(len(rec.rows(True))))
    history = frozen_model(rec).fit(row_ids(n), np.zeros((n, 1)), batch_size=batch_size, epochs=epochs,
                                    steps_per_epoch=steps, verbose=0, shuffle=False, callbacks=[cb])
    batches = rec.rows(True)
    bounds = marks + [len(batches)]
    return [batches[bounds[i]:bounds[i + 1]] for i in range(epochs)], history


B0, B1, B2, B3 = [0, 1, 2], [3, 4, 5], [6, 7, 8], [9]


@pytest.mark.parametrize("steps, expected, warns", [
    # Keras 3 (checked with keras 3.15, torch backend, on these 10 rows in batches of 3): epochs continue through
    # a pass; the epoch that reaches the end of the data stops there; the next epoch starts a new pass.
    (2, [[B0, B1], [B2, B3], [B0, B1]], False),
    (3, [[B0, B1, B2], [B3], [B0, B1, B2]], True),
    (4, [[B0, B1, B2, B3]] * 3, False),
    (7, [[B0, B1, B2, B3]] * 3, True),
])
def test_steps_per_epoch_on_arrays_follows_keras(steps, expected, warns):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, history = _rows_per_epoch(10, 3, 3, steps)
    assert got == expected
    assert history.params["steps"] == steps
    ran_out = [w for w in caught if "ran out of data" in str(w.message)]
    assert len(ran_out) == (1 if warns else 0)  # said once per fit, not once per short epoch


def test_batch_size_none_with_steps_is_derived_from_the_steps_as_keras():
    got, _ = _rows_per_epoch(10, None, 1, 3)
    assert got == [[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]]  # ceil(10 / 3) = 4 rows per batch
    rec = Recorder()
    model = frozen_model(rec)
    model.evaluate(row_ids(10), np.zeros((10, 1)), steps=2, verbose=0)
    model.predict(row_ids(10), steps=5)
    assert rec.rows(False) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def test_validation_steps_reads_the_first_batches_and_derives_the_batch_size():
    rec = Recorder()
    frozen_model(rec).fit(row_ids(10), np.zeros((10, 1)), batch_size=4, epochs=2, shuffle=False, verbose=0,
                          validation_data=(row_ids(10), np.zeros((10, 1))), validation_steps=2)
    assert rec.rows(False) == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2  # every validation starts at the beginning
    rec = Recorder()
    frozen_model(rec).fit(row_ids(10), np.zeros((10, 1)), epochs=1, shuffle=False, verbose=0,
                          validation_data=(row_ids(10), np.zeros((10, 1))), validation_steps=2)
    assert rec.rows(True) == [list(range(10))] and rec.rows(False) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


# -- shuffle and seed --------------------------------------------------------------------------------------
def test_shuffle_false_keeps_input_order():
    rec = Recorder()
    frozen_model(rec).fit(row_ids(9), np.zeros((9, 1)), batch_size=4, epochs=2, verbose=0, shuffle=False)
    assert rec.rows(True) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]] * 2


def _epoch_orders(seed, epochs=3, n=12, initial_epoch=0):
    rec = Recorder()
    frozen_model(rec).fit(row_ids(n), np.zeros((n, 1)), batch_size=5, epochs=epochs, verbose=0, shuffle=True,
                          seed=seed, initial_epoch=initial_epoch)
    flat = [r for b in rec.rows(True) for r in b]
    return [flat[i:i + n] for i in range(0, len(flat), n)]


def test_shuffle_with_seed_is_reproducible_and_a_permutation_per_epoch():
    a, b = _epoch_orders(7), _epoch_orders(7)
    assert a == b
    for order in a:
        assert sorted(order) == list(range(12))
    assert a[0] != list(range(12))
    assert a[0] != a[1] and a[1] != a[2] and a[0] != a[2]
    assert _epoch_orders(8) != a


def test_shuffle_depends_on_seed_and_epoch_only():
    """Resuming at initial_epoch=2 shuffles epoch 2 exactly as an uninterrupted run did."""
    full = _epoch_orders(11, epochs=3)
    resumed = _epoch_orders(11, epochs=3, initial_epoch=2)
    assert resumed == [full[2]]


def test_shuffle_without_seed_still_covers_every_row_once():
    order = _epoch_orders(None, epochs=1)[0]
    assert sorted(order) == list(range(12))


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_shuffle_must_be_a_bool(bad):
    with pytest.raises(TypeError, match="shuffle"):
        frozen_model(Recorder()).fit(row_ids(4), np.zeros((4, 1)), epochs=1, verbose=0, shuffle=bad)


@pytest.mark.parametrize("bad", [1.5, "3", True])
def test_seed_must_be_an_int(bad):
    with pytest.raises(TypeError, match="seed"):
        frozen_model(Recorder()).fit(row_ids(4), np.zeros((4, 1)), epochs=1, verbose=0, seed=bad)


# -- callbacks ---------------------------------------------------------------------------------------------
class _Recording(Callback):
    def __init__(self):
        super().__init__()
        self.events = []

    def _log(self, name, *args):
        self.events.append((name, *args))

    def on_train_begin(self, logs=None): self._log("train_begin")
    def on_train_end(self, logs=None): self._log("train_end")
    def on_epoch_begin(self, epoch, logs=None): self._log("epoch_begin", epoch)
    def on_epoch_end(self, epoch, logs=None): self._log("epoch_end", epoch, dict(logs))
    def on_train_batch_begin(self, batch, logs=None): self._log("batch_begin", batch)
    def on_train_batch_end(self, batch, logs=None): self._log("batch_end", batch, sorted(logs))
    def on_test_begin(self, logs=None): self._log("test_begin")
    def on_test_end(self, logs=None): self._log("test_end", dict(logs))
    def on_test_batch_begin(self, batch, logs=None): self._log("test_batch_begin", batch)
    def on_test_batch_end(self, batch, logs=None): self._log("test_batch_end", batch)


def test_callback_hooks_in_keras_order_with_epochs_and_logs():
    x, y = _xy(5, seed=2)
    cb = _Recording()
    model = frozen_model(Recorder(w=0.5), metrics=["mae"])
    history = model.fit(x, y, batch_size=2, epochs=3, initial_epoch=1, verbose=0, shuffle=False,
                        validation_split=0.4, callbacks=[cb])
    names = [e[0] if e[0] not in ("epoch_begin",) else (e[0], e[1]) for e in cb.events]
    one_epoch = lambda k: [("epoch_begin", k), "batch_begin", "batch_end", "batch_begin", "batch_end",  # noqa: E731
                           "test_begin", "test_batch_begin", "test_batch_end", "test_end", "epoch_end"]
    assert names == ["train_begin", *one_epoch(1), *one_epoch(2), "train_end"]
    assert [e[1] for e in cb.events if e[0] == "batch_begin"] == [0, 1, 0, 1]
    assert [e[1] for e in cb.events if e[0] == "epoch_end"] == [1, 2]
    assert all(e[2] == ["loss", "mae"] for e in cb.events if e[0] == "batch_end")
    epoch_logs = [e[2] for e in cb.events if e[0] == "epoch_end"]
    assert list(epoch_logs[0]) == ["loss", "mae", "val_loss", "val_mae"]
    test_logs = [e[1] for e in cb.events if e[0] == "test_end"]
    assert test_logs[0] == {"loss": epoch_logs[0]["val_loss"], "mae": epoch_logs[0]["val_mae"]}
    per = mse_rows(_linear_pred(x, 0.5), y)
    assert epoch_logs[0]["loss"] == pytest.approx(per[:3].mean(), rel=1e-12)
    assert epoch_logs[0]["val_loss"] == pytest.approx(per[3:].mean(), rel=1e-12)
    assert history.history["loss"] == [logs["loss"] for logs in epoch_logs]


def test_on_train_end_gets_the_last_epoch_logs():
    got = []
    model = frozen_model(Recorder(w=0.5))
    history = model.fit(row_ids(6), np.zeros((6, 1)), epochs=2, verbose=0, validation_split=0.5,
                        callbacks=[LambdaCallback(on_train_end=lambda logs: got.append(dict(logs)))])
    assert got == [{k: v[-1] for k, v in history.history.items()}]


def test_batch_logs_kept_by_a_callback_keep_their_values():
    kept = []
    model = frozen_model(Recorder(w=0.5))
    model.fit(row_ids(6), np.zeros((6, 1)), batch_size=2, epochs=1, verbose=0, shuffle=False,
              callbacks=[LambdaCallback(on_train_batch_end=lambda batch, logs: kept.append(logs))])
    per = (0.5 * np.arange(6)) ** 2
    assert [logs["loss"] for logs in kept] == pytest.approx([per[:2].mean(), per[:4].mean(), per.mean()])


def test_callbacks_get_model_and_params():
    got = {}

    class Peek(Callback):
        def on_train_begin(self, logs=None):
            got["model"], got["params"] = self.model, dict(self.params)

    model = frozen_model(Recorder())
    model.fit(row_ids(10), np.zeros((10, 1)), batch_size=3, epochs=2, verbose=0, callbacks=[Peek()])
    assert got["model"] is model
    assert got["params"]["epochs"] == 2 and got["params"]["steps"] == 4 and got["params"]["verbose"] == 0


def test_stop_training_from_a_callback_ends_after_the_current_epoch():
    model = frozen_model(Recorder())

    def stop(epoch, logs):
        if epoch == 1:
            model.stop_training = True

    history = model.fit(row_ids(4), np.zeros((4, 1)), epochs=10, verbose=0,
                        callbacks=[LambdaCallback(on_epoch_end=stop)])
    assert history.epoch == [0, 1]


def test_callbacks_must_be_callbacks():
    with pytest.raises(TypeError, match="Callback"):
        frozen_model(Recorder()).fit(row_ids(4), np.zeros((4, 1)), epochs=1, verbose=0, callbacks=[print])


# -- verbose -----------------------------------------------------------------------------------------------
class _Tty(io.StringIO):
    def isatty(self):
        return True


class _Slow(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = fixed_linear([[1.0]], [0.0])

    def forward(self, x):
        import time

        time.sleep(0.03)
        return self.lin(x)


def test_verbose_0_prints_nothing(capsys):
    model = frozen_model(Recorder())
    model.fit(row_ids(4), np.zeros((4, 1)), epochs=2, verbose=0, validation_split=0.5)
    model.evaluate(row_ids(4), np.zeros((4, 1)), verbose=0)
    model.predict(row_ids(4), verbose=0)
    assert capsys.readouterr().out == ""


def test_verbose_2_prints_one_line_per_epoch(capsys):
    x, y = _xy(6, seed=1)
    model = frozen_model(Recorder(w=0.5), metrics=["mae"])
    history = model.fit(x, y, epochs=3, batch_size=4, verbose=2, validation_split=0.5)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0::2] == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]
    for line, k in zip(lines[1::2], range(3)):
        assert re.match(r"^1/1 - \d+s - \d+(us|ms|s)/step - loss: \S+ - mae: \S+ - val_loss: \S+ - val_mae: \S+$",
                        line), line
        assert f"loss: {history.history['loss'][k]:.4f}" in line
        assert f"val_loss: {history.history['val_loss'][k]:.4f}" in line
    assert "[" not in "".join(lines) and "\r" not in "".join(lines)


def test_verbose_1_non_interactive_prints_the_final_bar(capsys):
    x, y = _xy(10, seed=1)
    model = frozen_model(Recorder(w=0.5))
    history = model.fit(x, y, epochs=10, initial_epoch=2, batch_size=4, verbose=1)
    out = capsys.readouterr().out
    assert "Epoch 3/10\n" in out and "Epoch 10/10\n" in out and "Epoch 2/10" not in out
    assert re.search(r"3/3 \[==============================\] - \d+s \d+(us|ms|s)/step - loss: \d+\.\d{4}", out)
    assert f"loss: {history.history['loss'][0]:.4f}" in out
    assert "ETA" not in out  # a pipe gets no in-place redraws


def test_verbose_1_interactive_shows_bar_eta_and_time_per_step(monkeypatch):
    fake = _Tty()
    monkeypatch.setattr(sys, "stdout", fake)
    model = frozen_model(_Slow())
    x, y = row_ids(12), np.ones((12, 1))
    model.fit(x, y, epochs=1, batch_size=2, verbose=1, shuffle=False)
    out = fake.getvalue()
    assert out.startswith("Epoch 1/1\n")
    assert re.search(r"\r\s*\d/6 \[=*>\.*\] - ETA: \d+s - loss: \d+\.\d{4}", out), out
    assert re.search(r"\r6/6 \[={30}\] - \d+s \d+ms/step - loss: \d+\.\d{4}\n$", out), out


def test_user_progbar_with_interactive_true(capsys):
    buf = io.StringIO()
    model = frozen_model(_Slow())
    model.fit(row_ids(6), np.ones((6, 1)), epochs=1, batch_size=2, verbose=1,
              callbacks=[ProgbarLogger(interval=0.0, stream=buf, interactive=True)])
    out = buf.getvalue()
    assert out.count("Epoch 1/1") == 1
    assert re.search(r"\r1/3 \[=+>?\.*\] - ETA: \d+s - loss: ", out), out
    assert "ms/step" in out
    # the user's ProgbarLogger replaces the default one, as in Keras: nothing else is printed
    assert capsys.readouterr().out == ""


def test_verbose_auto_is_2_when_not_a_terminal(capsys):
    model = frozen_model(Recorder())
    history = model.fit(row_ids(4), np.zeros((4, 1)), epochs=1)
    assert history.params["verbose"] == 2
    assert re.search(r"^1/1 - \d+s - ", capsys.readouterr().out.splitlines()[1])


def test_verbose_auto_is_1_on_a_terminal(monkeypatch):
    fake = _Tty()
    monkeypatch.setattr(sys, "stdout", fake)
    history = frozen_model(Recorder()).fit(row_ids(4), np.zeros((4, 1)), epochs=1)
    assert history.params["verbose"] == 1
    assert "[==============================]" in fake.getvalue()


@pytest.mark.parametrize("bad", [3, -1, "loud", 1.5])
def test_bad_verbose(bad):
    with pytest.raises(ValueError, match="verbose"):
        frozen_model(Recorder()).fit(row_ids(4), np.zeros((4, 1)), epochs=1, verbose=bad)


# -- argument checks -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["batch_size", "validation_batch_size", "steps_per_epoch", "validation_steps"])
@pytest.mark.parametrize("value", [0, -4, 2.5, True, "8"])
def test_non_positive_or_non_integer_sizes_are_rejected(name, value):
    with pytest.raises(ValueError, match=name):
        frozen_model(Recorder()).fit(row_ids(4), np.zeros((4, 1)), epochs=1, verbose=0, **{name: value})


@pytest.mark.parametrize("name,value", [("epochs", -1), ("epochs", 2.0), ("initial_epoch", -1),
                                        ("initial_epoch", "1")])
def test_bad_epochs(name, value):
    with pytest.raises(ValueError, match=name):
        frozen_model(Recorder()).fit(row_ids(4), np.zeros((4, 1)), verbose=0, **{name: value})


def test_fit_before_compile_is_an_error():
    model = dfit.Model(Recorder())
    with pytest.raises(RuntimeError, match="compile"):
        model.fit(row_ids(4), np.zeros((4, 1)), epochs=1, verbose=0)


def test_bad_input_raises_before_training_starts():
    rec = Recorder()
    model = frozen_model(rec)
    with pytest.raises(ValueError, match="sample_weight"):
        model.fit(row_ids(4), np.zeros((4, 1)), epochs=1, verbose=0, sample_weight=np.ones(3))
    assert rec.calls == []
